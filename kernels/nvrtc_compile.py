"""NVRTC compilation of the kernel sources (cuda-python), needing no GPU: the launcher compiles for
the device present, the tests for every target architecture."""

from __future__ import annotations

from pathlib import Path

from edgevl.device import check

KERNEL_DIR = Path(__file__).resolve().parent
HEADERS = ("cuda_compat.cuh", "resample.cuh", "pixel_shuffle.cuh")
# Source file -> the extern "C" kernels it defines.
KERNELS = {
    "tile_assembly.cu": ("edgevl_resample_first_pass", "edgevl_resample_second_pass"),
    "pixel_shuffle.cu": (
        "edgevl_pixel_shuffle_f32",
        "edgevl_pixel_shuffle_f16",
        "edgevl_pixel_shuffle_layernorm_f32",
        "edgevl_pixel_shuffle_layernorm_f16",
    ),
}
TARGET_ARCHS = (87, 89, 90, 110)  # Orin, Ada, Hopper, Thor


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message carries its log."""


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        raise ImportError("GPU kernels need cuda-python and NVRTC: pip install edgevl[gpu]") from e
    return nvrtc


def _check(result, what: str):
    return check(result, what, KernelCompileError)


def nvrtc_version() -> tuple[int, int]:
    return tuple(_check(_nvrtc().nvrtcVersion(), "nvrtcVersion"))


def supported_archs() -> tuple[int, ...]:
    return tuple(int(a) for a in _check(_nvrtc().nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs"))


def compile_source(source: str, arch: int, output: str = "cubin") -> bytes:
    """``source`` (a name in KERNELS) compiled for sm_<arch> to a cubin, or to PTX for compute_<arch>."""
    if source not in KERNELS:
        raise ValueError(f"unknown kernel source {source!r}; expected one of {sorted(KERNELS)}")
    if output not in ("cubin", "ptx"):
        raise ValueError(f"output must be 'cubin' or 'ptx', got {output!r}")
    nvrtc = _nvrtc()
    headers = [(KERNEL_DIR / h).read_bytes() for h in HEADERS]
    prog = _check(nvrtc.nvrtcCreateProgram((KERNEL_DIR / source).read_bytes(), source.encode(), len(headers),
                                           headers, [h.encode() for h in HEADERS]), "nvrtcCreateProgram")
    try:
        # cubin needs a real sm_ target; PTX a virtual compute_ one (JIT-compiled by the driver).
        target = f"--gpu-architecture={'sm' if output == 'cubin' else 'compute'}_{arch}"
        # No fast-math: the kernels' float work (fp16 rounding, LayerNorm) must follow IEEE.
        opts = [target.encode(), b"-std=c++17", b"--fmad=false"]
        err, = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if int(err) != 0:
            size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise KernelCompileError(f"NVRTC could not compile {source} for sm_{arch}: {err}\n"
                                     f"{log.decode(errors='replace')}")
        get_size, get = (nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN) if output == "cubin" else (
            nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX)
        size = _check(get_size(prog), "NVRTC output size")
        data = b" " * size
        _check((get(prog, data)[0], None), "NVRTC output")
        return data
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
