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

import onnx_ir as ir
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


def _export(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_shapes,
            weights_from: Path | None = None) -> None:
    """weights_from: see export_decoder_fixed_cache."""
    params_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)  # "torchvision is not installed" x4 per export: irrelevant here
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracing chatter
        program = torch.onnx.export(module, args, None, dynamo=True, opset_version=OPSET, input_names=input_names,
                                    output_names=output_names, dynamic_shapes=dynamic_shapes, verbose=False)
        if weights_from is None:
            program.save(str(path), external_data=params_bytes > EXTERNAL_DATA_BYTES)
        else:
            _point_into(program.model, weights_from)
            ir.save(program.model, str(path))  # external tensors stay references, the rest is embedded
    registration.setLevel(level)


def export_vision(vision: VisionModel, path: Path, max_tiles: int) -> None:
    """pixel_values [tiles, 3, 448, 448] -> image_embeds [tiles, 256, H], tiles dynamic in 1..max_tiles."""
    example = torch.zeros(2, 3, 448, 448)
    tiles = torch.export.Dim("tiles", min=1, max=max_tiles)
    _export(vision.float().eval(), (example,), path, ["pixel_values"], ["image_embeds"], ({0: tiles},))


def export_decoder(lm: LanguageModel, path: Path, max_seq: int) -> None:
    _export_decoder_module(_DecoderWithFlatCache(lm.float().eval()), path, max_seq, example_cache=3,
                           cache=torch.export.Dim("past", min=0, max=max_seq))


def _export_decoder_module(module: nn.Module, path: Path, max_seq: int, example_cache: int, cache,
                           weights_from: Path | None = None) -> None:
    """inputs_embeds [1, seq, H] + position_ids [1, seq] + per-layer KV [1, kv, cache, d] -> logits + present KV;
    seq dynamic in 1..max_seq, the KV's dim 2 as `cache` says."""
    spec = module.lm.spec
    past = [torch.zeros(1, spec.num_kv_heads, example_cache, spec.head_dim) for _ in range(2 * spec.num_layers)]
    args = (torch.zeros(1, 5, spec.hidden_size), torch.arange(3, 8)[None], *past)
    seq = torch.export.Dim("seq", min=1, max=max_seq)
    dynamic = ({1: seq}, {1: seq}, tuple({2: cache} for _ in past))
    _export(module, args, path, ["inputs_embeds", "position_ids"] + kv_names(spec.num_layers, "past_key_values"),
            ["logits"] + kv_names(spec.num_layers, "present"), dynamic, weights_from)


def export_decoder_fixed_cache(lm: LanguageModel, path: Path, max_seq: int, weights_from: Path | None = None) -> None:
    """decoder_fixed.onnx: the decoder with past/present [1, kv_heads, capacity, head_dim], capacity and seq dynamic
    up to max_seq (TensorRT fixes the capacity per plan). `weights_from`: decoder.onnx exported from the same model
    into the same directory; this graph's initializers then read its data file instead of writing a copy (a second
    15 GB of disk for InternVL2-4B at fp32)."""
    _export_decoder_module(_DecoderWithFlatCache(lm.float().eval(), fixed_capacity=True), path, max_seq,
                           example_cache=16, cache=torch.export.Dim("capacity", min=2, max=max_seq),
                           weights_from=weights_from)


def _content_digest(chunks) -> str:
    import hashlib

    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def _file_chunks(path: Path, offset: int, length: int, size: int = 1 << 24):
    with open(path, "rb") as f:
        f.seek(offset)
        while length > 0:
            chunk = f.read(min(length, size))
            if not chunk:
                raise ValueError(f"{path}: ends before the {length} bytes its graph says are at offset {offset}")
            yield chunk
            length -= len(chunk)


def _point_into(model: "ir.Model", source: Path) -> None:
    """Replace each initializer of `model` whose bytes equal one of `source`'s externally stored initializers with
    a reference into `source`'s data file (matched by content: the exporter names folded weights val_N, which
    differ between graphs); `model` is to be saved beside `source`. Only tensors whose type and shape match one of
    source's are hashed, one at a time."""
    import onnx

    source = Path(source)
    theirs: dict[tuple, dict[str, tuple]] = {}  # (data type, dims) -> sha256 -> (location, offset, length)
    for tensor in onnx.load(str(source), load_external_data=False).graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            where = (info["location"], int(info.get("offset", 0)), int(info["length"]))
            digest = _content_digest(_file_chunks(source.parent / where[0], *where[1:]))
            theirs.setdefault((tensor.data_type, tuple(tensor.dims)), {})[digest] = where
    for value in model.graph.initializers.values():
        tensor = value.const_value
        candidates = theirs.get((tensor.dtype.value, tuple(tensor.shape.numpy())), {})
        twin = candidates and candidates.get(_content_digest([tensor.tobytes()]))
        if twin:
            value.const_value = ir.ExternalTensor(*twin, tensor.dtype, shape=tensor.shape, name=value.name,
                                                  base_dir=source.parent)
