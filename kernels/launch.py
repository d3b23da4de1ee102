"""GPU launchers for the tile-assembly and pixel-shuffle kernels through cuda-python's driver API.

NVRTC compiles the sources at first use for the GPU present and caches the cubin on disk per
architecture (under $EDGEVL_CACHE_DIR, else $XDG_CACHE_HOME/edgevl, else ~/.cache/edgevl). cuda is
imported only when a :class:`CudaKernels` is built, so importing edgevl or edgevl.kernels never needs it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevl.device import DeviceBuffer, check
from edgevl.preprocess import TilingConfig

from .nvrtc_compile import HEADERS, KERNEL_DIR, KERNELS, compile_source, nvrtc_version, supported_archs
from .tile_plan import NORMALIZATION_TABLE, DRIVING_CANVAS_SIZE, plan_driving_views, plan_tiles

NO_DRIVER_MESSAGE = "no CUDA driver: GPU tiling needs an NVIDIA GPU; use preprocess='cpu'"
BLOCK = 256
LAYERNORM_BLOCK = 256


class NoCudaDevice(RuntimeError):
    """No CUDA driver or no GPU: GPU tiling is unavailable."""


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError as e:
        raise ImportError("GPU kernels need cuda-python: pip install edgevl[gpu]") from e
    return driver


def kernel_cache_dir() -> Path:
    root = os.environ.get("EDGEVL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "edgevl")
    return Path(root) / "kernels"


def cached_binary(source: str, arch: int, cache_dir: Path | None = None) -> bytes:
    """A cubin for sm_<arch>, or PTX for the newest older arch this NVRTC knows (the driver JITs it)."""
    archs = supported_archs()
    if arch in archs:
        target, output = arch, "cubin"
    else:
        older = [a for a in archs if a <= arch]
        if not older:
            raise NoCudaDevice(f"this NVRTC (supports sm_{archs}) cannot target the GPU's sm_{arch}")
        target, output = max(older), "ptx"
    text = b"".join((KERNEL_DIR / f).read_bytes() for f in (source, *HEADERS))
    key = hashlib.sha256(text + repr(nvrtc_version()).encode()).hexdigest()[:16]
    path = (cache_dir or kernel_cache_dir()) / f"{Path(source).stem}-sm_{target}-{key}.{output}"
    if path.exists():
        return path.read_bytes()
    binary = compile_source(source, target, output)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(binary)
    os.replace(tmp, path)  # atomic, so concurrent first uses never read half a file
    return binary


@dataclass(frozen=True)
class DeviceImage:
    """A decoded HWC uint8 image in device memory: rows `pitch` bytes apart, `pixel_bytes` per pixel (3, or 4
    with a junk 4th byte), channels in `channel_order`."""

    ptr: int
    width: int
    height: int
    pitch: int
    pixel_bytes: int = 3
    channel_order: str = "RGB"


class TileAssembly:
    """The launch sequence of the tile assembly, shared by the GPU (CudaKernels) and the host stand-in
    (host_build.HostDevice): subclasses provide resize_into (both passes of one resize), alloc and upload_into."""

    _canvas = None

    def upload(self, array: np.ndarray):
        array = np.ascontiguousarray(array)
        return self.upload_into(self.alloc(array.nbytes), array)

    def assemble_tiles(self, src_ptr: int, width: int, height: int, pitch: int, out_ptr: int,
                       config: TilingConfig = TilingConfig(), channel_order: str = "RGB", pixel_bytes: int = 3,
                       fp16: bool = False) -> int:
        """Tiles of a device image into out_ptr ([T, 3, S, S] fp32 or fp16, sized for
        edgevl.preprocess.num_tiles); returns T."""
        count, jobs = plan_tiles(width, height, config)
        for plan, dst in jobs:
            self.resize_into(src_ptr, pitch, pixel_bytes, channel_order == "BGR", plan, dst, config.image_size,
                             out_ptr, fp16)
        return count

    def assemble_driving_views(self, views: list[DeviceImage], out_ptr: int, config: TilingConfig = TilingConfig(),
                               fp16: bool = False) -> int:
        """The six camera views (CAMERA_ORDER, device images of any size) resized to 896x448 each into the
        2688x896 layout's 12 tiles plus its thumbnail, written to out_ptr ([13, 3, S, S]); returns 13."""
        size = config.image_size
        canvas_w, canvas_h = DRIVING_CANVAS_SIZE
        jobs = plan_driving_views([(v.width, v.height) for v in views], config)
        count, (_, (thumb_plan, thumb_dst)) = plan_tiles(canvas_w, canvas_h, config)
        canvas = self._canvas_buffer(canvas_h * canvas_w * 3)
        for view, (plan, dst) in zip(views, jobs):
            self.resize_into(view.ptr, view.pitch, view.pixel_bytes, view.channel_order == "BGR", plan, dst, size,
                             out_ptr, fp16, canvas.ptr, canvas_w * 3)
        self.resize_into(canvas.ptr, canvas_w * 3, 3, False, thumb_plan, thumb_dst, size, out_ptr, fp16)
        return count

    def _canvas_buffer(self, nbytes: int):
        # Kept, not freed per call: the launches reading it may still be queued when this returns.
        if self._canvas is None or self._canvas.nbytes < nbytes:
            self.synchronize()
            self._canvas = self.alloc(nbytes)
        return self._canvas


class CudaKernels(TileAssembly):
    """The kernels on one GPU: owns its context, modules, stream and cached coefficient tables."""

    def __init__(self, device: int = 0, cache_dir: str | os.PathLike | None = None):
        self.drv = drv = _driver()
        try:
            (err,) = drv.cuInit(0)
        except (RuntimeError, OSError) as e:  # libcuda.so itself missing
            raise NoCudaDevice(NO_DRIVER_MESSAGE) from e
        if err != drv.CUresult.CUDA_SUCCESS:
            raise NoCudaDevice(f"{NO_DRIVER_MESSAGE} (cuInit: {err.name})")
        if check(drv.cuDeviceGetCount(), "cuDeviceGetCount") <= device:
            raise NoCudaDevice(f"{NO_DRIVER_MESSAGE} (no CUDA device {device})")
        dev = check(drv.cuDeviceGet(device), "cuDeviceGet")
        attr = drv.CUdevice_attribute
        major = check(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "cc")
        minor = check(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "cc")
        self.arch = major * 10 + minor
        self.context = check(drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        check((drv.cuCtxSetCurrent(self.context)[0], None), "cuCtxSetCurrent")
        # Buffers come from the runtime API (edgevl.device), which allocates in the context current on this thread:
        # the primary context just made current, the one the TensorRT backend's runtime calls use too.
        from cuda.bindings import runtime

        self.runtime = runtime
        self.functions = {}
        self._modules = []
        for source, names in KERNELS.items():
            image = np.frombuffer(cached_binary(source, self.arch, cache_dir and Path(cache_dir)), np.uint8)
            image = np.append(image, np.uint8(0))  # PTX must be NUL-terminated; harmless for a cubin
            module = check(drv.cuModuleLoadData(image.ctypes.data), f"cuModuleLoadData({source})")
            self._modules.append(module)
            for name in names:
                self.functions[name] = check(drv.cuModuleGetFunction(module, name.encode()), name)
        self.stream = check(drv.cuStreamCreate(0), "cuStreamCreate")
        self._tables: dict[int, DeviceBuffer] = {}  # id(numpy table) -> device copy, kept with the plan
        self._plans: dict[tuple, object] = {}
        self._scratch: DeviceBuffer | None = None
        self.norm_table = self.upload(NORMALIZATION_TABLE)

    # -- memory ---------------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> DeviceBuffer:
        return DeviceBuffer(self.runtime, nbytes)

    def upload_into(self, buf: DeviceBuffer, array: np.ndarray) -> DeviceBuffer:
        """Copy a host array into the start of buf (at least array.nbytes); synchronous for pageable memory."""
        array = np.ascontiguousarray(array)
        if array.nbytes > buf.nbytes:
            raise ValueError(f"{array.nbytes} bytes do not fit a {buf.nbytes}-byte device buffer")
        check((self.drv.cuMemcpyHtoD(buf.ptr, array.ctypes.data, array.nbytes)[0], None), "cuMemcpyHtoD")
        return buf

    def download(self, buf: DeviceBuffer, shape, dtype) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        self.synchronize()
        check((self.drv.cuMemcpyDtoH(out.ctypes.data, buf.ptr, out.nbytes)[0], None), "cuMemcpyDtoH")
        return out

    def synchronize(self) -> None:
        check((self.drv.cuStreamSynchronize(self.stream)[0], None), "cuStreamSynchronize")

    def launch(self, name: str, blocks: int, threads: int, args: list[tuple[object, type]]) -> None:
        values = tuple(a for a, _ in args)
        types = tuple(t for _, t in args)
        check((self.drv.cuLaunchKernel(self.functions[name], blocks, 1, 1, threads, 1, 1, 0, self.stream,
                                            (values, types), 0)[0], None), f"cuLaunchKernel({name})")

    def _device_taps(self, plan):
        key = (plan.in_w, plan.in_h, plan.out_w, plan.out_h)
        if key not in self._plans:
            self._plans[key] = (plan, [self.upload(a) for a in (plan.first.bounds, plan.first.weights,
                                                                plan.second.bounds, plan.second.weights)])
        return self._plans[key][1]

    def _scratch_buffer(self, nbytes: int) -> DeviceBuffer:
        # One uint8 scratch reused by every resize on this stream; launches on one stream run in
        # order, so only growing it (freeing the old one) needs the stream idle.
        if self._scratch is None or self._scratch.nbytes < nbytes:
            self.synchronize()
            self._scratch = self.alloc(nbytes)
        return self._scratch

    # -- tile assembly --------------------------------------------------------------------------
    def resize_into(self, src_ptr: int, src_pitch: int, pixel_bytes: int, bgr: bool, plan, dst, tile_size: int,
                    tiles_ptr: int, fp16: bool, canvas_ptr: int = 0, canvas_pitch: int = 0) -> None:
        """Both passes of one resize from a pitched HWC uint8 image on the device into the tiles."""
        P, L, I = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
        b1, w1, b2, w2 = self._device_taps(plan)
        n1 = plan.scratch_h * plan.scratch_w * 3
        scratch = self._scratch_buffer(n1)
        self.launch("edgevl_resample_first_pass", (n1 + BLOCK - 1) // BLOCK, BLOCK, [
            (src_ptr, P), (src_pitch, L), (pixel_bytes, I), (plan.in_w, I), (plan.in_h, I), (int(bgr), I),
            (b1.ptr, P), (w1.ptr, P), (plan.first.ksize, I), (plan.first.axis, I), (plan.row0, I),
            (scratch.ptr, P), (plan.scratch_w * 3, L), (plan.scratch_w, I), (plan.scratch_h, I)])
        n2 = plan.out_h * plan.out_w * 3
        self.launch("edgevl_resample_second_pass", (n2 + BLOCK - 1) // BLOCK, BLOCK, [
            (scratch.ptr, P), (plan.scratch_w * 3, L), (plan.scratch_w, I), (plan.scratch_h, I),
            (b2.ptr, P), (w2.ptr, P), (plan.second.ksize, I), (plan.second.axis, I), (plan.second.shift, I),
            (plan.out_w, I), (plan.out_h, I), (dst.dst_x0, I), (dst.dst_y0, I), (dst.canvas_cols, I),
            (tile_size, I), (dst.tile_offset, I), (self.norm_table.ptr, P),
            (0 if fp16 else tiles_ptr, P), (tiles_ptr if fp16 else 0, P), (canvas_ptr, P), (canvas_pitch, L)])

    def assemble_tiles_numpy(self, image: np.ndarray, config: TilingConfig = TilingConfig(),
                             channel_order: str = "RGB", fp16: bool = False) -> np.ndarray:
        """Host array in, host array out (tests, benchmarks): the image goes to the device once."""
        h, w = image.shape[:2]
        src = self.upload(image)
        count, _ = plan_tiles(w, h, config)
        size = config.image_size
        out = self.alloc(count * 3 * size * size * (2 if fp16 else 4))
        self.assemble_tiles(src.ptr, w, h, w * image.shape[2], out.ptr, config, channel_order, image.shape[2], fp16)
        return self.download(out, (count, 3, size, size), np.float16 if fp16 else np.float32)

    def assemble_driving_views_numpy(self, views: list[np.ndarray], config: TilingConfig = TilingConfig(),
                                     channel_order: str = "RGB", fp16: bool = False) -> np.ndarray:
        size = config.image_size
        sources = [self.upload(view) for view in views]  # alive until the download synchronizes
        images = [DeviceImage(src.ptr, v.shape[1], v.shape[0], v.shape[1] * v.shape[2], v.shape[2], channel_order)
                  for v, src in zip(views, sources)]
        count = 2 * len(views) + 1
        out = self.alloc(count * 3 * size * size * (2 if fp16 else 4))
        self.assemble_driving_views(images, out.ptr, config, fp16)
        return self.download(out, (count, 3, size, size), np.float16 if fp16 else np.float32)

    # -- pixel shuffle --------------------------------------------------------------------------
    def pixel_shuffle(self, x_ptr: int, y_ptr: int, tiles: int, side: int, channels: int, ps_version: str,
                      fp16: bool = False) -> None:
        P, I = ctypes.c_void_p, ctypes.c_int
        n = tiles * side * side * channels
        name = "edgevl_pixel_shuffle_f16" if fp16 else "edgevl_pixel_shuffle_f32"
        self.launch(name, (n + BLOCK - 1) // BLOCK, BLOCK, [(x_ptr, P), (y_ptr, P), (tiles, I), (side, I),
                                                            (channels, I), (int(ps_version == "v2"), I)])

    def pixel_shuffle_layernorm(self, x_ptr: int, weight_ptr: int, bias_ptr: int, eps: float, y_ptr: int, tiles: int,
                                side: int, channels: int, ps_version: str, fp16: bool = False) -> None:
        P, I = ctypes.c_void_p, ctypes.c_int
        name = "edgevl_pixel_shuffle_layernorm_f16" if fp16 else "edgevl_pixel_shuffle_layernorm_f32"
        self.launch(name, tiles * (side // 2) ** 2, LAYERNORM_BLOCK, [
            (x_ptr, P), (weight_ptr, P), (bias_ptr, P), (eps, ctypes.c_float), (y_ptr, P), (tiles, I), (side, I),
            (channels, I), (int(ps_version == "v2"), I)])
