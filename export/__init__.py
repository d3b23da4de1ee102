"""ONNX export (and, later, TensorRT engine building) of edgevl models. Needs the `export` extra (torch, onnx)."""
from .exporter import PRECISIONS, export_model, quantize_export

__all__ = ["PRECISIONS", "export_model", "quantize_export"]
