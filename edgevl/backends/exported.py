"""What the backends of an `edgevl export` directory share (ONNX Runtime, TensorRT): the embedding table (a host
gather from embed_tokens.npy), the runtime's max_seq within the export's, images encoded `vision_batch` tiles at a
time from host arrays or from tiles already in device memory (GPU tiling), a prompt prefilled in chunks, and a
generated token decoded as a one-row step. Never imports torch.

A subclass sets vision_batch and prefill_chunk and implements _encode(tiles), _encode_device(ptr, tiles, dtype),
_reset() (a new sequence) and _step(embeds) (embeds [N, H] at positions _pos.._pos+N-1 -> the last logits)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SettingError
from ..gpu_preprocess import DeviceTiles
from ..manifest import Limits, Manifest


class ExportedBackend:
    takes_device_tiles = True  # encode_images reads DeviceTiles in place (GPU tiling hands them over)
    vision_batch: int  # tiles per vision run
    prefill_chunk: int | None = None  # positions per prefill run (None: the whole prompt in one)
    min_seq = 1  # the smallest runtime max_seq the backend supports

    def __init__(self, export_dir, manifest: Manifest, limits: Limits, max_seq: int | None, made: str, remake: str):
        """limits: what the graphs or plans were made for; `made` ("this export was made") and `remake`
        ("re-export") word the max_seq error."""
        if max_seq is not None and not self.min_seq <= max_seq <= limits.max_seq:
            raise SettingError("", "max_seq", max_seq, f"{made} for {self.min_seq}..{limits.max_seq} positions "
                               f"({remake} with a larger --max-seq for more)")
        self.max_seq, self.max_tiles = max_seq or limits.max_seq, limits.max_tiles
        self.embed_table = np.load(Path(export_dir) / manifest.graphs.embed_tokens, mmap_mode="r")
        self._pos = 0

    def encode_images(self, pixel_values) -> np.ndarray:
        """pixel_values [T, 3, S, S]: a host array (float32), or DeviceTiles from GPU tiling, encoded in place."""
        if isinstance(pixel_values, DeviceTiles):
            count, _, size, _ = pixel_values.shape
            tile_bytes = 3 * size * size * pixel_values.dtype.itemsize
            chunks = [self._encode_device(pixel_values.ptr + first * tile_bytes,
                                          min(self.vision_batch, count - first), pixel_values.dtype)
                      for first in range(0, count, self.vision_batch)]
        else:
            pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
            chunks = [self._encode(pixel_values[i:i + self.vision_batch])
                      for i in range(0, len(pixel_values), self.vision_batch)]
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def embed_tokens(self, token_ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.embed_table[np.asarray(token_ids, dtype=np.int64)], dtype=np.float32)

    def prefill(self, inputs_embeds: np.ndarray) -> np.ndarray:
        n = len(inputs_embeds)
        if not 0 < n <= self.max_seq:
            raise ValueError(f"prefill of {n} positions: expected 1..{self.max_seq} (the KV cache's capacity)")
        self._reset()
        self._pos = 0
        chunk = self._prefill_chunk(n)
        for start in range(0, n, chunk):
            logits = self._step(inputs_embeds[start:start + chunk])
        return logits

    def decode(self, token_id: int) -> np.ndarray:
        if self._pos >= self.max_seq:
            raise ValueError(f"the KV cache is full ({self.max_seq} positions)")
        return self._step(self.embed_tokens(np.array([token_id])))

    def _prefill_chunk(self, n: int) -> int:
        return self.prefill_chunk or n

    def _check_device_dtype(self, dtype) -> np.dtype:
        dtype = np.dtype(dtype)
        if dtype != self.vision_input_dtype:
            raise ValueError(f"device tiles are {dtype}, the vision engine takes {self.vision_input_dtype}")
        return dtype
