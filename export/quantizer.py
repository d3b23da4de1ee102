"""The one weight quantizer: symmetric integer weights for the decoder's MatMuls, shared by the ONNX Runtime CPU
decoder (export/cpu_graph.py, int8 per column) and TensorRT's weight-only decoders (export/trt/precision.py, int8
per column and int4 per block). edgevl.precisions says which scheme each precision uses."""
from __future__ import annotations

import numpy as np


def symmetric_weights(w: np.ndarray, bits: int, block_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """w [K, N] -> (q, scale) with w ~ q * scale: q int8 in [-(2^(bits-1) - 1), 2^(bits-1) - 1] (zero point 0, so
    -128 / -8 are never used: TensorRT's and MLAS's symmetric kernels), scale float32 [N] (one per output column)
    or [K / block_size, N] (one per block of block_size rows of K; block_size must divide K). An all-zero column
    or block gets the smallest positive scale and all-zero q."""
    limit = (1 << (bits - 1)) - 1
    w = np.asarray(w, dtype=np.float32)
    if block_size is None:
        scale = np.maximum(np.abs(w).max(axis=0), np.finfo(np.float32).tiny) / limit
        q = np.rint(w / scale)
    else:
        k, n = w.shape
        scale = np.maximum(np.abs(w).reshape(k // block_size, block_size, n).max(axis=1),
                           np.finfo(np.float32).tiny) / limit
        q = np.rint(w / np.repeat(scale, block_size, axis=0))
    return np.clip(q, -limit, limit).astype(np.int8), scale.astype(np.float32)
