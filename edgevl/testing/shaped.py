"""Random checkpoints with a real model's dimensions (`specs.KNOWN_SPECS`), for benchmarks: every figure can be
produced on any machine without downloading weights.

The weights are drawn exactly like the tiny test checkpoints (`checkpoints.random_weights`) and written in the
same on-disk formats, so the loaders, the exporter and transformers' `InternVLForConditionalGeneration` read them
as they read a real checkpoint. The tokenizer is the tiny test one: its few hundred ids cover the prompt and the
special tokens, while the embedding and lm_head keep the real vocabulary size (that is what costs time and
memory). Ids beyond the tokenizer are produced only by decoding random logits; they decode to no text.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..specs import KNOWN_SPECS, ModelSpec
from ..tokenizer import load_tokenizer
from .checkpoints import _config_hf, _config_original, _write_weights, random_weights, to_checkpoint_names
from .tokenizers import write_tokenizer

FORMATS = ("original", "hf")
_SHARD_BYTES = 2 << 30  # transformers' default shard size is 5 GB; smaller shards keep the writer's peak low


def known_spec(shape: str) -> ModelSpec:
    if shape not in KNOWN_SPECS:
        raise ValueError(f"shape={shape!r}: expected one of {tuple(KNOWN_SPECS)}")
    return KNOWN_SPECS[shape]


def write_shaped_checkpoint(out, shape: str = "internvl2-1b", formats=FORMATS, dtype: str = "float32",
                            seed: int = 0) -> dict[str, Path]:
    """Write one random checkpoint with `shape`'s dimensions in each of `formats` ("original", "hf"), from the
    same weights, to `out/<format>`; returns {format: directory}. float32 InternVL2-1B is ~3.8 GB per format."""
    spec = known_spec(shape)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"formats={bad}: expected a subset of {FORMATS}")
    out = Path(out)
    dirs = {fmt: out / fmt for fmt in formats}
    specials = {}
    for fmt, d in dirs.items():
        d.mkdir(parents=True, exist_ok=True)
        specials = write_tokenizer(d, spec.decoder.family, "json")
        if load_tokenizer(d).vocab_size > spec.decoder.vocab_size:
            raise ValueError(f"{shape}: the test tokenizer has more ids than the model's vocabulary")
    weights = random_weights(spec, seed)
    total_bytes = sum(w.nbytes for w in weights.values()) * (2 if dtype != "float32" else 4) // 4
    shards = max(1, -(-total_bytes // _SHARD_BYTES))
    for fmt, d in dirs.items():
        _write_weights(d, to_checkpoint_names(weights, spec, fmt), dtype, shards)
        config = (_config_original if fmt == "original" else _config_hf)(spec, specials, dtype)
        (d / "config.json").write_text(json.dumps(config, indent=2))
    return dirs

