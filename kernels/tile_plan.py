"""What the tile-assembly kernels run for one image: pure numpy, shared by the GPU launcher and the
host-emulation tests so both execute the same launches with the same coefficient tables.

A resize is two passes, as in Pillow: the first into an RGB uint8 scratch buffer, the second along
the other axis into the tiles. The coefficient tables come from :func:`edgevl.resample.bicubic_coefficients`
and the order from :func:`edgevl.resample.vertical_pass_first`, so the kernels match the numpy
reference bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgevl.preprocess import _NORMALIZATION_TABLE, TilingConfig, tile_grid
from edgevl.resample import bicubic_coefficients, vertical_pass_first

HORIZONTAL, VERTICAL = 1, 0  # the kernels' axis argument: 1 resamples along columns, 0 along rows
DRIVING_VIEW_SIZE = (896, 448)  # (w, h) of each camera view in the six-camera layout
DRIVING_CANVAS_SIZE = (2688, 896)  # three views across, two down

NORMALIZATION_TABLE = np.ascontiguousarray(_NORMALIZATION_TABLE, dtype=np.float32)  # [3, 256]


@dataclass(frozen=True)
class AxisPass:
    """One pass: its axis, Pillow's taps (bounds [n, 2], weights [n, ksize] int32) and the index
    shift of the buffer it reads (the first source row a trimmed scratch buffer holds)."""

    axis: int
    bounds: np.ndarray
    weights: np.ndarray
    shift: int = 0

    @property
    def ksize(self) -> int:
        return int(self.weights.shape[1])


@dataclass(frozen=True)
class ResizePlan:
    in_w: int
    in_h: int
    out_w: int
    out_h: int
    first: AxisPass
    second: AxisPass
    row0: int  # source row of scratch row 0 (horizontal-first only)
    scratch_w: int
    scratch_h: int


@dataclass(frozen=True)
class Destination:
    """Where a resized image lands: offset in a canvas of tile_size squares, canvas_cols across,
    numbered row-major from tile_offset."""

    dst_x0: int
    dst_y0: int
    canvas_cols: int
    tile_offset: int


def plan_resize(in_w: int, in_h: int, out_w: int, out_h: int) -> ResizePlan:
    """Both passes of ``Image.resize((out_w, out_h), BICUBIC)`` in the installed Pillow's order."""
    h_bounds, h_weights = bicubic_coefficients(in_w, out_w)
    v_bounds, v_weights = bicubic_coefficients(in_h, out_h)
    if vertical_pass_first(in_w, in_h, out_w, out_h):
        first = AxisPass(VERTICAL, v_bounds, v_weights)
        return ResizePlan(in_w, in_h, out_w, out_h, first, AxisPass(HORIZONTAL, h_bounds, h_weights), 0, in_w, out_h)
    # ImagingResampleInner resamples only the rows the vertical pass reads. A pass whose axis keeps
    # its size is skipped by Pillow; here it runs with Pillow's identity taps (one weight of 2**22),
    # which gives the same bytes.
    row0 = int(v_bounds[0, 0])
    row_end = int(v_bounds[-1, 0] + v_bounds[-1, 1])
    first = AxisPass(HORIZONTAL, h_bounds, h_weights)
    second = AxisPass(VERTICAL, v_bounds, v_weights, shift=row0)
    return ResizePlan(in_w, in_h, out_w, out_h, first, second, row0, out_w, row_end - row0)


def plan_tiles(width: int, height: int,
               config: TilingConfig = TilingConfig()) -> tuple[int, list[tuple[ResizePlan, Destination]]]:
    """(tile count, resizes) for one image: the grid resize, then the thumbnail when the grid has 2+ cells."""
    size = config.image_size
    cols, rows = tile_grid(width, height, config)
    jobs = [(plan_resize(width, height, cols * size, rows * size), Destination(0, 0, cols, 0))]
    if config.use_thumbnail and cols * rows > 1:
        jobs.append((plan_resize(width, height, size, size), Destination(0, 0, 1, cols * rows)))
    return cols * rows + len(jobs) - 1, jobs


def plan_driving_views(view_sizes: list[tuple[int, int]],
                       config: TilingConfig = TilingConfig()) -> list[tuple[ResizePlan, Destination]]:
    """Six views (w, h) each resized to 896x448 into the 2688x896 canvas, three across and two down.

    The canvas tiles as a 6x2 grid of 448 squares (12 tiles), so each view's second pass writes its
    tiles directly; the uint8 canvas it also writes is the thumbnail's source.
    """
    if len(view_sizes) != 6:
        raise ValueError(f"the driving layout takes exactly 6 camera views, got {len(view_sizes)}")
    size = config.image_size
    canvas_w, canvas_h = DRIVING_CANVAS_SIZE
    if tile_grid(canvas_w, canvas_h, config) != (canvas_w // size, canvas_h // size):
        raise ValueError(
            f"the {canvas_w}x{canvas_h} driving canvas must tile as a {canvas_w // size}x{canvas_h // size} grid of "
            f"{size}px tiles, but TilingConfig {config} picks {tile_grid(canvas_w, canvas_h, config)}"
        )
    view_w, view_h = DRIVING_VIEW_SIZE
    return [
        (plan_resize(w, h, view_w, view_h), Destination((k % 3) * view_w, (k // 3) * view_h, canvas_w // size, 0))
        for k, (w, h) in enumerate(view_sizes)
    ]
