"""Synthetic images: deterministic, with structure (gradients, shapes, text-like stripes) so resizing and tiling
errors show up, unlike flat or pure-noise images. The product uses them where no user images are given: int8
calibration, drift measurement, the demo and the benchmarks; the tests use them throughout."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def synthetic_image(width: int = 800, height: int = 600, seed: int = 0) -> np.ndarray:
    """HWC uint8 RGB."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), 0.5 + 0.5 * np.sin(x / 17 + y / 23)], -1)
    for _ in range(6):  # a few solid rectangles with sharp edges
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        img[y0:y0 + height // 5, x0:x0 + width // 7] = rng.random(3)
    img[(y.astype(int) // 3) % 7 == 0] *= 0.6  # fine horizontal stripes
    noise = rng.normal(0, 0.03, img.shape)
    return np.clip((img + noise) * 255 + 0.5, 0, 255).astype(np.uint8)


def write_demo_image(path, width: int = 800, height: int = 600) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic_image(width, height)).save(path)
    return path
