"""Read a local InternVL checkpoint (either format) into a spec and our named weights, torch-free.

safetensors is read directly (header JSON + memory-mapped data) so bf16 weights need no torch; every
failure names the file and key.
"""
from __future__ import annotations

import ctypes
import json
import math
import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Callable

import ml_dtypes
import numpy as np

from .specs import (CheckpointError, Fields, ModelSpec, checkpoint_format, read_config, read_json, snippet,
                    spec_from_config)
from .weights import WeightEntry, expected_shapes, normalize_hf_name, weight_entries

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
                      "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
SAFETENSORS_MAX_HEADER_BYTES = 100_000_000  # the format's own limit (MAX_HEADER_SIZE in safetensors' reader)
# Buffers some exporters save that carry no learned state.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class Checkpoint:
    path: Path
    format: str  # "original" | "hf"
    config: dict
    spec: ModelSpec
    weights: "Weights"  # our names; float32 / float16 / bfloat16 (ml_dtypes) as stored

    @property
    def dtype(self) -> str:
        return str(self.weights.dtype("decoder.embed.weight"))


class Weights(Mapping):
    """Our names -> arrays, each read from its memory-mapped file when asked for: a fresh array per read (stored
    parts joined, InternLM2's wqkv regrouped), after which the file's pages are dropped from this process's
    resident set. Loading a checkpoint therefore holds no weights, and a model built from it costs its own
    tensors only, not those plus the mapped file pages (which count as resident until the kernel reclaims them)."""

    def __init__(self, parts: dict[str, tuple[list[np.ndarray], Callable | None]], spec):
        self._parts, self._spec = parts, spec

    def __getitem__(self, name: str) -> np.ndarray:
        parts, transform = self._parts[name]
        array = np.array(parts[0]) if len(parts) == 1 else np.concatenate(parts, axis=0)
        for part in parts:
            _drop_resident_pages(part)
        return transform(array, self._spec.decoder) if transform else array

    def __iter__(self):
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)

    def dtype(self, name: str) -> np.dtype:
        return self._parts[name][0][0].dtype

    def elements(self, name: str) -> int:
        """The element count of `name`, from the stored parts' shapes (nothing is read)."""
        return sum(part.size for part in self._parts[name][0])


_MADV_DONTNEED = 4


def _drop_resident_pages(array: np.ndarray) -> None:
    """Unmap the whole pages of a memory-mapped array from this process (madvise DONTNEED on a read-only file
    mapping: a later read faults them in again from the page cache)."""
    if not isinstance(array, np.memmap) or array.nbytes < mmap.PAGESIZE:
        return
    start = -(-array.ctypes.data // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (array.ctypes.data + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        try:
            ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)
        except (OSError, AttributeError, TypeError):  # no madvise (not POSIX): the pages stay until reclaimed
            pass


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-mapped arrays of one .safetensors file; its whole header is checked before any array is made."""
    path = Path(path)
    try:
        file_bytes = path.stat().st_size
        with open(path, "rb") as f:
            header_bytes = _header_length(f.read(8), file_bytes, path)
            header = json.loads(f.read(header_bytes))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing weight file") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, an integer of 4300+ digits
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON: {e})") from None
    data_start = 8 + header_bytes
    entries = _check_header(header, file_bytes - data_start, path)
    # np.memmap refuses an empty range; a data section of zero bytes can only hold empty tensors.
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start) if file_bytes > data_start else \
        np.zeros(0, np.uint8)
    return {name: data[start:end].view(dtype).reshape(shape) for name, (dtype, shape, start, end) in entries.items()}


def _header_length(prefix: bytes, file_bytes: int, path: Path) -> int:
    if len(prefix) < 8:
        raise CheckpointError(f"{path}: {file_bytes} bytes; not a safetensors file (it starts with an 8-byte "
                              "header length)")
    (header_bytes,) = struct.unpack("<Q", prefix)
    if header_bytes > SAFETENSORS_MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: header length {header_bytes} bytes, over the safetensors format's limit of "
                              f"{SAFETENSORS_MAX_HEADER_BYTES}: not a safetensors file, or a corrupted one")
    if 8 + header_bytes > file_bytes:
        raise CheckpointError(f"{path}: header length {header_bytes} bytes, but the file has {file_bytes - 8} after "
                              "the length field (truncated?)")
    return header_bytes


def _check_header(header, data_bytes: int, path: Path) -> dict[str, tuple[np.dtype, list[int], int, int]]:
    """name -> (dtype, shape, start, end) of every tensor, each checked against the format and the data section."""
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is {snippet(header)}; a safetensors header is a JSON object")
    entries = {}
    for name, info in header.items():
        if name != "__metadata__":
            entries[name] = _tensor_entry(name, info, data_bytes, path)
        elif not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
            raise CheckpointError(f"{path}: __metadata__ is {snippet(info)}; expected an object of strings")
    spans = sorted((start, end, name) for name, (_, _, start, end) in entries.items() if end > start)
    for (_, previous_end, previous), (start, _, name) in zip(spans, spans[1:]):
        if start < previous_end:
            raise CheckpointError(f"{path}: tensors {snippet(previous)} and {snippet(name)} share bytes {start}.."
                                  f"{previous_end} of the data section; each tensor needs a range of its own")
    return entries


def _tensor_entry(name: str, info, data_bytes: int, path: Path) -> tuple[np.dtype, list[int], int, int]:
    where = f"{path}: tensor {snippet(name)}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where} is {snippet(info)}; expected an object with dtype, shape and data_offsets")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{where} has unsupported dtype {snippet(dtype)} "
                              f"(supported: {', '.join(SAFETENSORS_DTYPES)})")
    if not _integers(shape) or min(shape, default=0) < 0:
        raise CheckpointError(f"{where}: shape = {snippet(shape)}; expected a list of non-negative integers")
    if not _integers(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise CheckpointError(f"{where}: data_offsets = {snippet(offsets)}; expected [start, end] with "
                              "0 <= start <= end")
    start, end = offsets
    if end > data_bytes:
        raise CheckpointError(f"{where} ends at byte {end}, past the file's end ({data_bytes} data bytes; "
                              "truncated?)")
    numpy_dtype = np.dtype(SAFETENSORS_DTYPES[dtype])
    if end - start != math.prod(shape) * numpy_dtype.itemsize:
        raise CheckpointError(f"{where}: data_offsets [{start}, {end}] span {end - start} bytes, but shape "
                              f"{snippet(shape)} of {dtype} takes {math.prod(shape) * numpy_dtype.itemsize}")
    return numpy_dtype, shape, start, end


def _integers(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> file holding it, from the shard index or a single model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = Fields(read_json(index), index).table("weight_map", str)
        files = {name: _shard(model_dir, fname, index) for name, fname in weight_map.items()}
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


def _shard(model_dir: Path, name: str, index: Path) -> Path:
    # Lexical only: a hub cache's snapshot files are links into its blobs folder, outside the model directory.
    parts = PurePath(name).parts
    if not parts or PurePath(name).is_absolute() or ".." in parts or "\0" in name:
        raise CheckpointError(f"{index}: weight_map names shard {snippet(name)}; shards must be files inside "
                              f"{model_dir} (a relative path without '..')")
    return model_dir / name


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
    parts_of, used, shapes = {}, set(), expected_shapes(spec)
    for entry in weight_entries(spec, fmt):
        tied = spec.decoder.tie_word_embeddings and entry.ours == "decoder.lm_head.weight"
        if tied and entry.sources[0] not in stored:
            parts_of[entry.ours] = parts_of["decoder.embed.weight"]
            continue
        missing = [s for s in entry.sources if s not in stored]
        if missing:
            raise CheckpointError(f"{model_dir}: missing weight {missing[0]!r} (needed for {entry.ours})")
        parts = [stored[s][0] for s in entry.sources]
        used.update(entry.sources)
        _check_parts(entry, parts, shapes[entry.ours], model_dir)
        parts_of[entry.ours] = (parts, entry.transform)
    unexpected = sorted(n for n in stored if n not in used and not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise CheckpointError(f"{stored[unexpected[0]][1]}: unexpected weight {unexpected[0]!r} "
                              f"({len(unexpected)} unexpected in all); the config does not describe this checkpoint")
    return Checkpoint(model_dir, fmt, config, spec, Weights(parts_of, spec))


def _check_parts(entry: WeightEntry, parts: list[np.ndarray], shape: tuple[int, ...], model_dir: Path) -> None:
    """Before joining: the stored tensors, concatenated along dim 0, have one dtype and config.json's shape."""
    if len({p.dtype for p in parts}) > 1:
        raise CheckpointError(f"{model_dir}: {entry.sources} mix dtypes {[str(p.dtype) for p in parts]}")
    stored = [p.shape for p in parts]
    if all(s and s[1:] == stored[0][1:] for s in stored):
        got = [sum(s[0] for s in stored), *stored[0][1:]]
    else:
        got = " + ".join(str(list(s)) for s in stored)
    if got != list(shape):
        raise CheckpointError(f"{model_dir}: weight {' + '.join(entry.sources)!r} has shape {got}, but config.json "
                              f"implies {list(shape)} (for {entry.ours})")
