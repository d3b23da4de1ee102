"""PyTorch -> ONNX for the two graphs every backend runs: vision (InternViT + pixel shuffle + projector) and the
decoder with an explicit KV cache.

KV layout (recorded in the manifest): per layer `past_key_values.{i}.key|value` [1, kv_heads, past, head_dim] in,
`present.{i}.key|value` [1, kv_heads, past + seq, head_dim] out, grown by Concat inside the graph. Standard ops
only, so the same graph runs in ONNX Runtime (CPU, CUDA) and parses in TensorRT 10.x; the decoder returns the
last position's logits only (prefill never needs S x vocab).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from edgevl.modeling import LanguageModel, VisionModel

OPSET = 18
EXTERNAL_DATA_BYTES = 1 << 30  # well under protobuf's 2 GB limit


def kv_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


class _DecoderWithFlatCache(nn.Module):
    """ONNX wants flat named inputs; the model takes a list of (key, value) pairs."""

    def __init__(self, lm: LanguageModel):
        super().__init__()
        self.lm = lm

    def forward(self, inputs_embeds, position_ids, *past):
        cache = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, present = self.lm(inputs_embeds, position_ids, cache)
        return (logits,) + tuple(t for kv in present for t in kv)


def _export(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_shapes) -> None:
    params_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)  # "torchvision is not installed" x4 per export: irrelevant here
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracing chatter
        torch.onnx.export(module, args, str(path), dynamo=True, opset_version=OPSET, input_names=input_names,
                          output_names=output_names, dynamic_shapes=dynamic_shapes,
                          external_data=params_bytes > EXTERNAL_DATA_BYTES, verbose=False)
    registration.setLevel(level)


def export_vision(vision: VisionModel, path: Path, max_tiles: int) -> None:
    """pixel_values [tiles, 3, 448, 448] -> image_embeds [tiles, 256, H], tiles dynamic in 1..max_tiles."""
    example = torch.zeros(2, 3, 448, 448)
    tiles = torch.export.Dim("tiles", min=1, max=max_tiles)
    _export(vision.float().eval(), (example,), path, ["pixel_values"], ["image_embeds"], ({0: tiles},))


def export_decoder(lm: LanguageModel, path: Path, max_seq: int) -> None:
    spec = lm.spec
    past = [torch.zeros(1, spec.num_kv_heads, 3, spec.head_dim) for _ in range(2 * spec.num_layers)]
    args = (torch.zeros(1, 5, spec.hidden_size), torch.arange(3, 8)[None], *past)
    seq = torch.export.Dim("seq", min=1, max=max_seq)
    past_len = torch.export.Dim("past", min=0, max=max_seq)
    dynamic = ({1: seq}, {1: seq}, tuple({2: past_len} for _ in past))
    _export(_DecoderWithFlatCache(lm.float().eval()), args, path,
            ["inputs_embeds", "position_ids"] + kv_names(spec.num_layers, "past_key_values"),
            ["logits"] + kv_names(spec.num_layers, "present"), dynamic)
