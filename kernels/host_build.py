"""Host build of the CUDA kernels for tests: compiles ``host_emulation.cpp`` (which includes the .cu
sources as C++) with g++ into a shared library and runs the tiling plan through it with
ctypes. Every launch walks all its threads on the CPU, calling the same functions the GPU runs.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from edgevl.preprocess import TilingConfig

from .launch import TileAssembly
from .tile_plan import NORMALIZATION_TABLE, DRIVING_CANVAS_SIZE, Destination, ResizePlan, plan_driving_views, plan_tiles

KERNEL_DIR = Path(__file__).resolve().parent
SOURCES = ("cuda_compat.cuh", "resample.cuh", "pixel_shuffle.cuh", "tile_assembly.cu", "pixel_shuffle.cu",
           "host_emulation.cpp")


class NoHostCompiler(RuntimeError):
    """No C++ compiler on PATH."""


def find_host_compiler() -> list[str] | None:
    """The command that builds the host library (the .cu files read as C++), or None."""
    # nvcc is no fallback: it needs one of these as its host compiler anyway.
    for cxx in ("g++", "clang++", "c++"):
        if shutil.which(cxx):
            return [cxx, "-x", "c++", "-std=c++17"]
    return None


def build_host_library(out_dir: str | os.PathLike | None = None) -> Path:
    compiler = find_host_compiler()
    if compiler is None:
        raise NoHostCompiler("no C++ compiler (g++, clang++, c++) on PATH: cannot build the host kernels")
    digest = hashlib.sha256(b"".join((KERNEL_DIR / s).read_bytes() for s in SOURCES) + " ".join(compiler).encode())
    out_dir = Path(out_dir or tempfile.gettempdir())
    lib = out_dir / f"libedgevl_kernels_host_{digest.hexdigest()[:16]}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        cmd = [*compiler, "-O2", "-Wall", "-shared", "-fPIC", str(KERNEL_DIR / "host_emulation.cpp"), "-o", str(tmp)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, lib)
    return lib


def _ptr(a: np.ndarray | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if a is None else a.ctypes.data)


class HostKernels:
    """The host-emulated kernels behind the same calls the GPU launcher makes."""

    def __init__(self, lib_path: str | os.PathLike):
        self.lib = ctypes.CDLL(str(lib_path))
        for name in (
            "edgevl_host_resample_first_pass",
            "edgevl_host_resample_second_pass",
            "edgevl_host_pixel_shuffle_f32",
            "edgevl_host_pixel_shuffle_f16",
            "edgevl_host_pixel_shuffle_layernorm_f32",
        ):
            getattr(self.lib, name).restype = None

    def resize_into(self, src: np.ndarray, bgr: bool, plan: ResizePlan, dst: Destination, tile_size: int,
                    tiles_f32: np.ndarray | None, tiles_f16: np.ndarray | None, canvas: np.ndarray | None) -> None:
        """src: a [H, W, >=3] uint8 view whose rows may be pitched (strides[0] > W * pixel bytes)."""
        assert src.strides[2] == 1 and src.strides[0] >= src.shape[1] * src.strides[1]
        scratch = np.empty((plan.scratch_h, plan.scratch_w, 3), dtype=np.uint8)
        first, second = plan.first, plan.second
        b1, w1 = np.ascontiguousarray(first.bounds), np.ascontiguousarray(first.weights)
        b2, w2 = np.ascontiguousarray(second.bounds), np.ascontiguousarray(second.weights)
        L = ctypes.c_longlong
        self.lib.edgevl_host_resample_first_pass(
            _ptr(src), L(src.strides[0]), src.strides[1], plan.in_w, plan.in_h, int(bgr),
            _ptr(b1), _ptr(w1), first.ksize, first.axis, plan.row0,
            _ptr(scratch), L(scratch.strides[0]), plan.scratch_w, plan.scratch_h)
        self.lib.edgevl_host_resample_second_pass(
            _ptr(scratch), L(scratch.strides[0]), plan.scratch_w, plan.scratch_h,
            _ptr(b2), _ptr(w2), second.ksize, second.axis, second.shift,
            plan.out_w, plan.out_h, dst.dst_x0, dst.dst_y0, dst.canvas_cols, tile_size, dst.tile_offset,
            _ptr(NORMALIZATION_TABLE), _ptr(tiles_f32), _ptr(tiles_f16), _ptr(canvas),
            L(0 if canvas is None else canvas.strides[0]))

    def assemble_tiles(self, src: np.ndarray, config: TilingConfig = TilingConfig(), channel_order: str = "RGB",
                       dtype=np.float32) -> np.ndarray:
        """[T, 3, S, S] of ``dtype`` (float32 or float16) for one pitched HWC uint8 image."""
        size = config.image_size
        count, jobs = plan_tiles(src.shape[1], src.shape[0], config)
        out = np.empty((count, 3, size, size), dtype=np.float32 if dtype == np.float32 else np.uint16)
        for plan, dst in jobs:
            f32, f16 = (out, None) if dtype == np.float32 else (None, out)
            self.resize_into(src, channel_order == "BGR", plan, dst, size, f32, f16, None)
        return out if dtype == np.float32 else out.view(np.float16)

    def assemble_driving_views(self, views: list[np.ndarray], config: TilingConfig = TilingConfig(),
                               channel_order: str = "RGB") -> np.ndarray:
        """[13, 3, S, S] float32: the six views' 12 canvas tiles, then the canvas thumbnail."""
        size = config.image_size
        canvas_w, canvas_h = DRIVING_CANVAS_SIZE
        jobs = plan_driving_views([(v.shape[1], v.shape[0]) for v in views], config)
        out = np.empty((len(jobs) * 2 + 1, 3, size, size), dtype=np.float32)
        canvas = np.empty((canvas_h, canvas_w, 3), dtype=np.uint8)
        for view, (plan, dst) in zip(views, jobs):
            self.resize_into(view, channel_order == "BGR", plan, dst, size, out, None, canvas)
        count, (_, (thumb_plan, thumb_dst)) = plan_tiles(canvas_w, canvas_h, config)
        assert count == out.shape[0]
        self.resize_into(canvas, False, thumb_plan, thumb_dst, size, out, None, None)
        return out

    def pixel_shuffle(self, x: np.ndarray, ps_version: str) -> np.ndarray:
        tiles, tokens, channels = x.shape
        side = int(round(tokens ** 0.5))
        y = np.empty((tiles, tokens // 4, channels * 4), dtype=x.dtype)
        v2 = int(ps_version == "v2")
        if x.dtype == np.float32:
            self.lib.edgevl_host_pixel_shuffle_f32(_ptr(x), _ptr(y), tiles, side, channels, v2)
        else:
            self.lib.edgevl_host_pixel_shuffle_f16(_ptr(x), _ptr(y), tiles, side, channels, v2)
        return y

    def pixel_shuffle_layernorm(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float,
                                ps_version: str) -> np.ndarray:
        tiles, tokens, channels = x.shape
        side = int(round(tokens ** 0.5))
        y = np.empty((tiles, tokens // 4, channels * 4), dtype=np.float32)
        self.lib.edgevl_host_pixel_shuffle_layernorm_f32(
            _ptr(x), _ptr(weight), _ptr(bias), ctypes.c_float(eps), _ptr(y), tiles, side, channels,
            int(ps_version == "v2"))
        return y


class HostBuffer:
    """Host memory standing in for a device allocation: `ptr` is a real address the host kernels write."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.array = np.empty(max(self.nbytes, 1), dtype=np.uint8)
        self.ptr = self.array.ctypes.data


class HostDevice(TileAssembly):
    """A stand-in for CudaKernels whose "device pointers" are host addresses: the same launch sequence
    (TileAssembly) runs the host-emulated kernels, so code written against device pointers (the GPU
    preprocessing seam, a backend binding a pointer) runs end to end without a GPU."""

    def __init__(self, lib_path: str | os.PathLike):
        self.kernels = HostKernels(lib_path)
        self.norm_table = NORMALIZATION_TABLE
        self.launches = 0  # resizes run, so tests can see the seam really went through the kernels

    def alloc(self, nbytes: int) -> HostBuffer:
        return HostBuffer(nbytes)

    def upload_into(self, buf: HostBuffer, array: np.ndarray) -> HostBuffer:
        array = np.ascontiguousarray(array)
        if array.nbytes > buf.nbytes:
            raise ValueError(f"{array.nbytes} bytes do not fit a {buf.nbytes}-byte buffer")
        ctypes.memmove(buf.ptr, array.ctypes.data, array.nbytes)
        return buf

    def download(self, buf: HostBuffer, shape, dtype) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        ctypes.memmove(out.ctypes.data, buf.ptr, out.nbytes)
        return out

    def synchronize(self) -> None:
        pass

    def resize_into(self, src_ptr: int, src_pitch: int, pixel_bytes: int, bgr: bool, plan: ResizePlan,
                    dst: Destination, tile_size: int, tiles_ptr: int, fp16: bool, canvas_ptr: int = 0,
                    canvas_pitch: int = 0) -> None:
        """CudaKernels.resize_into's arguments, run through the host build."""
        self.launches += 1
        lib, first, second = self.kernels.lib, plan.first, plan.second
        b1, w1 = np.ascontiguousarray(first.bounds), np.ascontiguousarray(first.weights)
        b2, w2 = np.ascontiguousarray(second.bounds), np.ascontiguousarray(second.weights)
        scratch = np.empty((plan.scratch_h, plan.scratch_w, 3), dtype=np.uint8)
        P, L = ctypes.c_void_p, ctypes.c_longlong
        lib.edgevl_host_resample_first_pass(
            P(src_ptr), L(src_pitch), pixel_bytes, plan.in_w, plan.in_h, int(bgr), _ptr(b1), _ptr(w1), first.ksize,
            first.axis, plan.row0, _ptr(scratch), L(scratch.strides[0]), plan.scratch_w, plan.scratch_h)
        lib.edgevl_host_resample_second_pass(
            _ptr(scratch), L(scratch.strides[0]), plan.scratch_w, plan.scratch_h, _ptr(b2), _ptr(w2), second.ksize,
            second.axis, second.shift, plan.out_w, plan.out_h, dst.dst_x0, dst.dst_y0, dst.canvas_cols, tile_size,
            dst.tile_offset, _ptr(NORMALIZATION_TABLE), P((not fp16 and tiles_ptr) or None),
            P((fp16 and tiles_ptr) or None), P(canvas_ptr or None), L(canvas_pitch))
