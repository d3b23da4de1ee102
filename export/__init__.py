"""ONNX export of edgevl models, and TensorRT engine building from it (`export/trt/`). Needs the `export` extra
(torch, onnx, onnxscript); building also needs tensorrt and a GPU."""
from .exporter import export_model, quantize_export

__all__ = ["export_model", "quantize_export"]
