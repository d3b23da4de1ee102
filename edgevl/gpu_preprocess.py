"""Where an image is tiled: on the host (preprocess_image, the reference) or on the GPU (kernels/), the tiles then
staying on the device for the vision engine, so a frame crosses to the GPU once, as decoded uint8.

The pipeline (api.EdgeVL) talks to one preprocessor through three calls:
    tile(image, config, channel_order)      -> pixel values: a host array [T, 3, S, S] or DeviceTiles
    tile_driving(views, channel_order, cfg) -> the same for the six-camera dict
    content_key(pixel_values)               -> the chat embedding cache's key
and hands the pixel values to the backend's encode_images (the exported backends read DeviceTiles in place).
Both kinds of pixel values have .shape, so tile counts read the same way.

Importing this module never imports cuda; building a DevicePreprocessor for a GPU does.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .preprocess import CHANNEL_ORDERS, TilingConfig, load_image, num_tiles, preprocess_image

PREPROCESS_CHOICES = ("gpu", "cpu")
GPU_BACKENDS = "backend='tensorrt', or backend='onnxruntime' with device='cuda'"


class PreprocessUnavailable(RuntimeError):
    """preprocess='gpu' where GPU tiling cannot run (a host backend, no GPU, no cuda-python or NVRTC)."""


# -- choosing ---------------------------------------------------------------------------------------------

def runs_on_gpu(backend: str, device: str) -> bool:
    """Whether the vision engine of this backend reads device memory (so GPU tiles can be handed to it)."""
    from .backends import backend_entry

    return backend_entry(backend).gpu_vision(device)


def resolve_preprocess(requested: str | None, backend: str, device: str) -> str:
    """"gpu" or "cpu" for EdgeVL.from_pretrained(preprocess=requested): None picks "gpu" where the vision engine
    runs on the GPU, else "cpu". "gpu" elsewhere is an error, never a silent fallback."""
    if requested is None:
        return "gpu" if runs_on_gpu(backend, device) else "cpu"
    if requested not in PREPROCESS_CHOICES:
        raise ValueError(f"preprocess={requested!r}: expected one of {PREPROCESS_CHOICES} (or None for the default)")
    if requested == "gpu" and not runs_on_gpu(backend, device):
        raise PreprocessUnavailable(
            f"preprocess='gpu' needs a vision engine on the GPU ({GPU_BACKENDS}); backend={backend!r} "
            f"device={device!r} encodes host arrays, so GPU tiles would only be copied back: use preprocess='cpu'")
    return requested


def make_preprocessor(mode: str, backend, device: str = "cuda"):
    """The preprocessor for a resolved mode; "gpu" compiles (or loads the cached) kernels for the GPU present."""
    if mode == "cpu":
        return HostPreprocessor()
    if not getattr(backend, "takes_device_tiles", False):
        raise PreprocessUnavailable(f"preprocess='gpu': {type(backend).__name__} cannot encode tiles from device "
                                    f"memory; use {GPU_BACKENDS}, or preprocess='cpu'")
    try:
        from .kernels.launch import CudaKernels, NoCudaDevice
    except ImportError as e:
        raise PreprocessUnavailable(f"preprocess='gpu' needs the edgevl.kernels package ({e}); "
                                    "reinstall edgevl, or use preprocess='cpu'") from None
    from .device import device_index

    index = device_index(device)
    try:
        kernels = CudaKernels(index)
    except (ImportError, NoCudaDevice) as e:
        raise PreprocessUnavailable(f"preprocess='gpu' cannot run here: {e}. Install the GPU extra (pip install "
                                    "'edgevl[gpu]': cuda-python + NVRTC), or use preprocess='cpu'") from None
    except Exception as e:  # NVRTC failures, module loads: name them, keep the cause
        raise PreprocessUnavailable(f"preprocess='gpu': the tiling kernels failed to load on cuda:{index} ({e}); "
                                    "use preprocess='cpu'") from e
    return DevicePreprocessor(kernels, backend.vision_input_dtype)


# -- on the host (the reference) --------------------------------------------------------------------------

def tiles_content_key(pixel_values: np.ndarray) -> str:
    # The normalised tiles, not the source, so one picture given as a path and as an array shares an entry.
    digest = hashlib.blake2b(np.ascontiguousarray(pixel_values).view(np.uint8), digest_size=16)
    digest.update(str(pixel_values.shape).encode())
    return digest.hexdigest()


class HostPreprocessor:
    name = "cpu"

    def tile(self, image, config: TilingConfig, channel_order: str = "RGB") -> np.ndarray:
        return preprocess_image(image, config, channel_order)

    def tile_driving(self, views: dict, channel_order: str, config: TilingConfig) -> np.ndarray:
        from .formats.driving import assemble_views

        return preprocess_image(assemble_views(views, channel_order, draw_labels=True), config)

    def content_key(self, pixel_values: np.ndarray) -> str:
        return tiles_content_key(pixel_values)


# -- on the GPU -------------------------------------------------------------------------------------------

@dataclass(eq=False)
class DeviceTiles:
    """Normalised tiles [T, 3, S, S] of `dtype` in device memory (`buffer.ptr`), and what they were made from
    (host uint8 arrays, kept for the cache key; their device copies stay alive until the tiles are encoded)."""

    buffer: object
    shape: tuple[int, int, int, int]
    dtype: np.dtype
    sources: tuple[np.ndarray, ...]
    recipe: str  # channel orders + tiling, the rest of the key

    @property
    def ptr(self) -> int:
        return self.buffer.ptr

    def content_key(self) -> str:
        digest = hashlib.blake2b(digest_size=16)
        for source in self.sources:
            digest.update(np.ascontiguousarray(source).view(np.uint8))
            digest.update(str(source.shape).encode())
        digest.update(f"{self.recipe}|{self.dtype}".encode())
        return digest.hexdigest()


def decoded_hwc(image, channel_order: str = "RGB") -> tuple[np.ndarray, str]:
    """(HxWx3 uint8 array, its channel order): a colour array as given (no channel swap on the host), anything
    else (path, PIL image, grey array) decoded to RGB by load_image, with its checks and errors."""
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order must be one of {CHANNEL_ORDERS}, got {channel_order!r}")
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 \
            and image.size:
        return image, channel_order
    return np.asarray(load_image(image, channel_order)), "RGB"


class DevicePreprocessor:
    """GPU tiling through `kernels` (edgevl.kernels.launch.CudaKernels, or host_build.HostDevice in tests) into
    the vision engine's input dtype (float32 or float16)."""

    name = "gpu"

    def __init__(self, kernels, dtype):
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float16):
            raise PreprocessUnavailable(f"preprocess='gpu': the vision engine takes {dtype} pixel values; the tiling "
                                        "kernels write float32 or float16: use preprocess='cpu'")
        self.kernels, self.dtype = kernels, dtype
        self._staging = None  # one device buffer for the uint8 source, grown as needed

    def tile(self, image, config: TilingConfig, channel_order: str = "RGB") -> DeviceTiles:
        array, order = decoded_hwc(image, channel_order)
        height, width = array.shape[:2]
        out = self._tiles_buffer(num_tiles(width, height, config), config)
        src = self._upload(array)
        count = self.kernels.assemble_tiles(src.ptr, width, height, width * 3, out.ptr, config, order, 3,
                                            self.dtype == np.float16)
        self.kernels.synchronize()  # before the staging buffer is reused; and the time shows up as preprocessing
        return self._tiles(out, count, config, (array,), order)

    def tile_driving(self, views: dict, channel_order: str, config: TilingConfig,
                     draw_labels: bool = True) -> DeviceTiles:
        """The six-camera dict as 12 tiles + thumbnail. draw_labels=True (what the model was trained on, and the
        host path) draws the camera names into the 896x448 views, which the kernels cannot: the views are
        resized and labelled on the host (formats.driving.assemble_views) and the 2688x896 result tiled here.
        draw_labels=False resizes the six views on the GPU (the kernels' six-view path)."""
        from .formats.driving import CAMERA_ORDER, assemble_views, check_cameras

        if draw_labels:
            return self.tile(assemble_views(views, channel_order, draw_labels=True), config, "RGB")
        if not isinstance(views, dict):
            raise ValueError(f"driving views: expected a dict {{camera: image}}, got {type(views).__name__}")
        check_cameras(views)
        decoded = [decoded_hwc(views[camera], channel_order) for camera in CAMERA_ORDER]
        from .kernels.launch import DeviceImage

        sources = [self.kernels.upload(np.ascontiguousarray(a)) for a, _ in decoded]
        images = [DeviceImage(s.ptr, a.shape[1], a.shape[0], a.shape[1] * 3, 3, order)
                  for s, (a, order) in zip(sources, decoded)]
        out = self._tiles_buffer(2 * len(images) + 1, config)
        count = self.kernels.assemble_driving_views(images, out.ptr, config, self.dtype == np.float16)
        self.kernels.synchronize()  # the sources may be freed once this returns
        orders = "".join(order[0] for _, order in decoded)
        return self._tiles(out, count, config, tuple(a for a, _ in decoded), f"six-view {orders}")

    def content_key(self, pixel_values: DeviceTiles) -> str:
        return pixel_values.content_key()

    def _tiles_buffer(self, count: int, config: TilingConfig):
        return self.kernels.alloc(count * 3 * config.image_size ** 2 * self.dtype.itemsize)

    def _upload(self, array: np.ndarray):
        array = np.ascontiguousarray(array)
        if self._staging is None or self._staging.nbytes < array.nbytes:
            self._staging = self.kernels.alloc(array.nbytes)
        return self.kernels.upload_into(self._staging, array)

    def _tiles(self, out, count: int, config: TilingConfig, sources, orders: str) -> DeviceTiles:
        size = config.image_size
        recipe = f"{orders}|{config.image_size},{config.min_tiles},{config.max_tiles},{config.use_thumbnail}"
        return DeviceTiles(out, (count, 3, size, size), self.dtype, sources, recipe)
