"""Read a local InternVL checkpoint (either format) into a spec and our named weights, torch-free.

safetensors is read directly (header JSON + memory-mapped data) so bf16 weights need no torch; every
failure names the file and key.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from .specs import CheckpointError, ModelSpec, checkpoint_format, read_config, spec_from_config
from .weights import expected_shapes, normalize_hf_name, weight_entries

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
                      "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
# Buffers some exporters save that carry no learned state.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class Checkpoint:
    path: Path
    format: str  # "original" | "hf"
    config: dict
    spec: ModelSpec
    weights: dict[str, np.ndarray]  # our names; float32 / float16 / bfloat16 (ml_dtypes) as stored

    @property
    def dtype(self) -> str:
        return str(self.weights["decoder.embed.weight"].dtype)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-mapped arrays of one .safetensors file."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing weight file") from None
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if end > data.size:
            raise CheckpointError(f"{path}: tensor {name!r} ends at byte {end}, past the file's end (truncated?)")
        dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
        tensors[name] = data[start:end].view(dtype).reshape(info["shape"])
    return tensors


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> file holding it, from the shard index or a single model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not weight_map:
            raise CheckpointError(f"{index}: missing key 'weight_map'")
        files = {name: model_dir / fname for name, fname in weight_map.items()}
        for name, path in files.items():
            if not path.is_file():
                raise CheckpointError(f"{path}: shard listed in {index.name} (e.g. for {name!r}) is missing")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return {name: single for name in read_safetensors(single)}
    found = sorted(p.name for p in model_dir.glob("*.bin"))
    hint = f" (found {', '.join(found)}: convert PyTorch .bin weights to safetensors)" if found else ""
    raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json{hint}")


def _read_all(files: dict[str, Path], rename) -> dict[str, tuple[np.ndarray, Path]]:
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    tensors = {}
    for path, names in by_file.items():
        stored = read_safetensors(path)
        for name in names:
            if name not in stored:
                raise CheckpointError(f"{path}: tensor {name!r} is listed in the index but not in the file")
            tensors[rename(name)] = (stored[name], path)
    return tensors


def load_checkpoint(model_dir) -> Checkpoint:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory")
    config = read_config(model_dir)
    fmt = checkpoint_format(config, model_dir)
    spec = spec_from_config(config, model_dir)
    stored = _read_all(_weight_files(model_dir), normalize_hf_name if fmt == "hf" else (lambda n: n))
    weights, used, sources = {}, set(), {}
    for entry in weight_entries(spec, fmt):
        sources[entry.ours] = " + ".join(entry.sources)
        if entry.ours == "decoder.lm_head.weight" and entry.sources[0] not in stored and _tied(config, fmt):
            weights[entry.ours] = weights["decoder.embed.weight"]
            continue
        missing = [s for s in entry.sources if s not in stored]
        if missing:
            raise CheckpointError(f"{model_dir}: missing weight {missing[0]!r} (needed for {entry.ours})")
        parts = [stored[s][0] for s in entry.sources]
        used.update(entry.sources)
        if len({p.dtype for p in parts}) > 1:
            raise CheckpointError(f"{model_dir}: {entry.sources} mix dtypes {[str(p.dtype) for p in parts]}")
        array = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        weights[entry.ours] = entry.transform(array, spec.decoder) if entry.transform else array
    unexpected = sorted(n for n in stored if n not in used and not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise CheckpointError(f"{stored[unexpected[0]][1]}: unexpected weight {unexpected[0]!r} "
                              f"({len(unexpected)} unexpected in all); the config does not describe this checkpoint")
    _check_shapes(weights, sources, spec, model_dir)
    return Checkpoint(model_dir, fmt, config, spec, weights)


def _tied(config: dict, fmt: str) -> bool:
    llm = config.get("llm_config" if fmt == "original" else "text_config", {})
    return bool(llm.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))


def _check_shapes(weights: dict[str, np.ndarray], sources: dict[str, str], spec: ModelSpec, model_dir: Path):
    for name, shape in expected_shapes(spec).items():
        got = tuple(weights[name].shape)
        if got != shape:
            raise CheckpointError(f"{model_dir}: weight {sources[name]!r} has shape {list(got)}, but config.json "
                                  f"implies {list(shape)} (for {name})")
