"""Plain-numpy reference of Pillow's BICUBIC resize, bit-exact for 8-bit images.

This mirrors libImaging/Resample.c (``precompute_coeffs``, ``normalize_coeffs_8bpc``,
``ImagingResample{Horizontal,Vertical}_8bpc``, ``ImagingResampleInner``) so that the CUDA
tile-assembly kernel has a readable spec to match. The production CPU path calls Pillow itself;
this module is for parity tests and for the kernel launcher, which reuses
:func:`bicubic_coefficients` to build its weight tables.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import __version__ as _pillow_version

BICUBIC_SUPPORT = 2.0
PRECISION_BITS = 22  # Pillow: 32 - 8 - 2, leaving two bits for the filter's negative lobes
_PILLOW_MAJOR = int(_pillow_version.split(".")[0])


def _bicubic_filter(x: np.ndarray) -> np.ndarray:
    """Keys cubic with a = -0.5, each expression in Pillow's evaluation order (bit-exact doubles)."""
    a = -0.5
    x = np.abs(x)
    inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    outer = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


def _to_fixed_point(weights: np.ndarray) -> np.ndarray:
    """normalize_coeffs_8bpc: scale by 2**22 and round half away from zero (C truncating cast)."""
    scaled = weights * (1 << PRECISION_BITS)
    return np.trunc(np.where(weights < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)


def bicubic_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's per-output-pixel taps for resampling one axis from ``in_size`` to ``out_size``.

    Returns ``bounds`` [out_size, 2] int32 (first source index, tap count) and ``weights``
    [out_size, ksize] int32 in 22-bit fixed point; taps past the count are exactly 0.
    """
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
    scale = in_size / out_size
    # Shrinking widens the kernel by the scale factor: this is Pillow's antialiasing.
    filterscale = max(scale, 1.0)
    support = BICUBIC_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1

    center = (np.arange(out_size) + 0.5) * scale
    # C's (int) cast truncates toward zero; negatives are clamped to 0 right after, so trunc is exact.
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64)
    count = xmax - xmin

    taps = np.arange(ksize)
    raw = _bicubic_filter((taps[None, :] + xmin[:, None] - center[:, None] + 0.5) * (1.0 / filterscale))
    raw = np.where(taps[None, :] < count[:, None], raw, 0.0)
    # Pillow sums taps left to right; np.sum's pairwise order could differ in the last bit.
    total = np.zeros(out_size)
    for t in range(ksize):
        total = total + raw[:, t]
    normalized = raw / np.where(total != 0.0, total, 1.0)[:, None]

    bounds = np.stack([xmin, count], axis=1).astype(np.int32)
    return bounds, _to_fixed_point(normalized)


def _resample_axis(src: np.ndarray, bounds: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """One 8bpc pass along ``axis`` (0 rows, 1 columns) of an [H, W, C] uint8 image."""
    out_shape = list(src.shape)
    out_shape[axis] = len(bounds)
    acc = np.full(out_shape, 1 << (PRECISION_BITS - 1), dtype=np.int32)  # round-half-up bias
    weight_shape = (-1, 1, 1) if axis == 0 else (1, -1, 1)
    last = src.shape[axis] - 1
    for t in range(weights.shape[1]):
        # Taps past a pixel's count carry weight 0, so clamping their index only keeps it in range.
        index = np.minimum(bounds[:, 0] + t, last)
        acc += src.take(index, axis=axis).astype(np.int32) * weights[:, t].reshape(weight_shape)
    return np.clip(acc >> PRECISION_BITS, 0, 255).astype(np.uint8)


def vertical_pass_first(in_w: int, in_h: int, out_w: int, out_h: int) -> bool:
    """Whether the installed Pillow resamples rows (the vertical pass) before columns.

    Pillow >= 13 (PR #9549) goes vertical first when the height shrinks by more than twice as many
    pixels as the width does; older Pillow is always horizontal first. The order changes how the
    uint8 intermediate rounds, so a bit-exact port (and the CUDA kernel) must follow it.
    """
    if _PILLOW_MAJOR < 13:
        return False
    return out_h < in_h and in_h - out_h > 2 * (in_w - out_w)


def resize_bicubic(img: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """``Image.resize((out_w, out_h), Image.BICUBIC)`` on an [H, W, C] uint8 array, bit-exact."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"expected a non-empty [H, W, C] uint8 array, got shape {img.shape} dtype {img.dtype}")
    in_h, in_w = img.shape[:2]
    if vertical_pass_first(in_w, in_h, out_w, out_h):
        return _vertical_then_horizontal(img, out_w, out_h)
    return _horizontal_then_vertical(img, out_w, out_h)


def _horizontal_then_vertical(img: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    in_h, in_w = img.shape[:2]
    out = img
    v_bounds, v_weights = bicubic_coefficients(in_h, out_h)
    if out_w != in_w:
        # Like ImagingResampleInner: only the source rows the vertical pass reads are resampled
        # horizontally (to a uint8 intermediate), and the vertical bounds shift to match.
        first_row = int(v_bounds[0, 0])
        last_row = int(v_bounds[-1, 0] + v_bounds[-1, 1])
        out = _resample_axis(img[first_row:last_row], *bicubic_coefficients(in_w, out_w), axis=1)
        v_bounds = v_bounds - np.array([first_row, 0], dtype=np.int32)
    if out_h != in_h:
        out = _resample_axis(out, v_bounds, v_weights, axis=0)
    return out.copy() if out is img else out  # a pass is skipped when its axis keeps its size


def _vertical_then_horizontal(img: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    in_h, in_w = img.shape[:2]
    out = _resample_axis(img, *bicubic_coefficients(in_h, out_h), axis=0)
    if out_w != in_w:
        out = _resample_axis(out, *bicubic_coefficients(in_w, out_w), axis=1)
    return out
