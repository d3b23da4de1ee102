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

from edgevl.manifest import EXTERNAL_DATA_BYTES
from edgevl.modeling import LanguageModel, VisionModel

OPSET = 18


def kv_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


class _DecoderWithFlatCache(nn.Module):
    """ONNX wants flat named inputs; the model takes a list of (key, value) pairs. fixed_capacity: the cache policy
    of LanguageModel.forward (decoder_fixed.onnx)."""

    def __init__(self, lm: LanguageModel, fixed_capacity: bool = False):
        super().__init__()
        self.lm, self.fixed_capacity = lm, fixed_capacity

    def forward(self, inputs_embeds, position_ids, *past):
        cache = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, present = self.lm(inputs_embeds, position_ids, cache, fixed_capacity=self.fixed_capacity)
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
    _export_decoder_module(_DecoderWithFlatCache(lm.float().eval()), path, max_seq, example_cache=3,
                           cache=torch.export.Dim("past", min=0, max=max_seq))


def _export_decoder_module(module: nn.Module, path: Path, max_seq: int, example_cache: int, cache) -> None:
    """inputs_embeds [1, seq, H] + position_ids [1, seq] + per-layer KV [1, kv, cache, d] -> logits + present KV;
    seq dynamic in 1..max_seq, the KV's dim 2 as `cache` says."""
    spec = module.lm.spec
    past = [torch.zeros(1, spec.num_kv_heads, example_cache, spec.head_dim) for _ in range(2 * spec.num_layers)]
    args = (torch.zeros(1, 5, spec.hidden_size), torch.arange(3, 8)[None], *past)
    seq = torch.export.Dim("seq", min=1, max=max_seq)
    dynamic = ({1: seq}, {1: seq}, tuple({2: cache} for _ in past))
    _export(module, args, path, ["inputs_embeds", "position_ids"] + kv_names(spec.num_layers, "past_key_values"),
            ["logits"] + kv_names(spec.num_layers, "present"), dynamic)


def export_decoder_fixed_cache(lm: LanguageModel, path: Path, max_seq: int, weights_from: Path | None = None) -> None:
    """decoder_fixed.onnx: the decoder with past/present [1, kv_heads, capacity, head_dim], capacity and seq dynamic
    up to max_seq (TensorRT fixes the capacity per plan). When `weights_from` (decoder.onnx, exported from the same
    model) keeps its weights in external data, this graph's initializers point into that file instead of a copy."""
    _export_decoder_module(_DecoderWithFlatCache(lm.float().eval(), fixed_capacity=True), path, max_seq,
                           example_cache=16, cache=torch.export.Dim("capacity", min=2, max=max_seq))
    if weights_from is not None:
        share_external_weights(path, weights_from)


def _external_key(tensor, base: Path) -> tuple:
    """(data type, dims, sha256 of the bytes) of an externally stored initializer, streamed from its file."""
    import hashlib

    info = {e.key: e.value for e in tensor.external_data}
    digest, remaining = hashlib.sha256(), int(info["length"])
    with open(base / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        while remaining > 0:
            chunk = f.read(min(remaining, 1 << 24))
            if not chunk:
                raise ValueError(f"{base / info['location']}: shorter than {tensor.name}'s external data says")
            digest.update(chunk)
            remaining -= len(chunk)
    return tensor.data_type, tuple(tensor.dims), digest.hexdigest()


def share_external_weights(path: Path, source: Path) -> int:
    """Rewrite `path` so each externally stored initializer whose bytes equal one of `source`'s external
    initializers reads `source`'s data file (matched by content: the exporter names folded weights val_N, which
    differ between graphs). Tensors without a twin are embedded; `path`'s own data file is then deleted. Returns
    the number of shared tensors."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor

    path, source = Path(path), Path(source)
    model = onnx.load(str(path), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return 0
    theirs = {}
    for tensor in onnx.load(str(source), load_external_data=False).graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            theirs[_external_key(tensor, source.parent)] = (info["location"], int(info.get("offset", 0)),
                                                            int(info["length"]))
    own_files, shared = set(), 0
    for tensor in external:
        own_files.add(next(e.value for e in tensor.external_data if e.key == "location"))
        twin = theirs.get(_external_key(tensor, path.parent))
        if twin is not None:
            del tensor.external_data[:]
            for key, value in zip(("location", "offset", "length"), twin):
                tensor.external_data.add(key=key, value=str(value))
            shared += 1
        else:
            load_external_data_for_tensor(tensor, str(path.parent))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    onnx.save(model, str(path))
    for name in own_files:
        (path.parent / name).unlink()
    return shared
