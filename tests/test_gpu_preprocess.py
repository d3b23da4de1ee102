"""GPU preprocessing seam (edgevl.gpu_preprocess): the choice of where images are tiled and its errors, the chat
cache key, and the whole pipeline with device tiles. Without a GPU, kernels/host_build.HostDevice stands in for
the device (host memory behind the "device pointers", the kernels' host build behind the launches) and the
ONNX Runtime CPU backend binds those pointers through the same IOBinding call it makes on CUDA."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from edgevl import EdgeVL
from edgevl.formats.driving import CAMERA_ORDER, assemble_views
from edgevl.gpu_preprocess import (DevicePreprocessor, DeviceTiles, HostPreprocessor, PreprocessUnavailable,
                                   make_preprocessor, resolve_preprocess)
from edgevl.kernels.host_build import HostDevice, build_host_library, find_host_compiler
from edgevl.preprocess import TilingConfig, preprocess_image
from edgevl.synthetic import synthetic_image

TWELVE = TilingConfig(max_tiles=12)


@pytest.fixture(scope="module")
def host_device(tmp_path_factory):
    if find_host_compiler() is None:
        pytest.skip("no host C++ compiler (g++, clang++ or c++) on PATH to build kernels/host_emulation.cpp")
    return HostDevice(build_host_library(tmp_path_factory.mktemp("kernels")))


@pytest.fixture(scope="module")
def qwen2_export(exported):
    return exported("qwen2")


def device_pixels(preprocessor: DevicePreprocessor, tiles) -> np.ndarray:
    return preprocessor.kernels.download(tiles.buffer, tiles.shape, tiles.dtype)


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint16)


# -- choosing where to tile ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device,want", [
    ("tensorrt", "cpu", "gpu"), ("tensorrt", "cuda", "gpu"), ("tensorrt", "cuda:1", "gpu"),
    ("onnxruntime", "cuda", "gpu"), ("onnxruntime", "cpu", "cpu"), ("torch", "cpu", "cpu"), ("torch", "cuda", "cpu"),
])
def test_default_per_backend(backend, device, want):
    assert resolve_preprocess(None, backend, device) == want


@pytest.mark.parametrize("backend,device", [("onnxruntime", "cpu"), ("torch", "cpu"), ("torch", "cuda")])
def test_gpu_on_a_host_backend_is_an_error(backend, device):
    with pytest.raises(PreprocessUnavailable, match=rf"backend='{backend}' device='{device}' encodes host arrays.*"
                                                    r"use preprocess='cpu'"):
        resolve_preprocess("gpu", backend, device)


def test_unknown_choice():
    with pytest.raises(ValueError, match=r"preprocess='GPU': expected one of \('gpu', 'cpu'\)"):
        resolve_preprocess("GPU", "tensorrt", "cuda")


def test_from_pretrained_gpu_on_cpu_onnxruntime_raises(qwen2_export):
    with pytest.raises(PreprocessUnavailable, match="backend='onnxruntime' device='cpu'"):
        EdgeVL.from_pretrained(qwen2_export, preprocess="gpu")


def test_from_pretrained_gpu_on_torch_raises(tiny_checkpoint):
    with pytest.raises(PreprocessUnavailable, match="backend='torch'"):
        EdgeVL.from_pretrained(tiny_checkpoint("qwen2"), preprocess="gpu")


def test_from_pretrained_defaults_to_host_tiling_on_cpu(qwen2_export, tiny_checkpoint):
    assert EdgeVL.from_pretrained(qwen2_export).preprocessor.name == "cpu"
    assert EdgeVL.from_pretrained(tiny_checkpoint("qwen2")).preprocessor.name == "cpu"


class _DeviceBackend:
    vision_input_dtype = np.dtype(np.float32)
    takes_device_tiles = True


def test_backend_without_device_encoding_is_refused():
    with pytest.raises(PreprocessUnavailable, match="object cannot encode tiles from device memory"):
        make_preprocessor("gpu", object(), "cuda")


def test_gpu_without_a_driver_names_the_reason():
    try:
        preprocessor = make_preprocessor("gpu", _DeviceBackend(), "cuda")
    except PreprocessUnavailable as e:
        assert "preprocess='cpu'" in str(e)
        return
    pytest.skip(f"a CUDA device is present ({type(preprocessor.kernels).__name__}): the no-GPU error is unreachable")


def test_bfloat16_engines_are_refused(host_device):
    with pytest.raises(PreprocessUnavailable, match="float32 or float16"):
        DevicePreprocessor(host_device, np.dtype("int8"))


# -- device tiles equal the host reference ------------------------------------------------------------------

@pytest.mark.parametrize("channel_order", ["RGB", "BGR"])
@pytest.mark.parametrize("size", [(900, 500), (333, 1200), (64, 64)])
def test_device_tiles_equal_preprocess_image(host_device, size, channel_order):
    image = synthetic_image(*size, seed=size[0])
    gpu = DevicePreprocessor(host_device, np.float32)
    tiles = gpu.tile(image, TWELVE, channel_order)
    want = preprocess_image(image, TWELVE, channel_order)
    assert tiles.shape == want.shape
    assert np.array_equal(bits(device_pixels(gpu, tiles)), bits(want))


def test_paths_pil_and_grey_arrays_are_decoded_on_the_host(host_device, tmp_path):
    gpu = DevicePreprocessor(host_device, np.float32)
    image = synthetic_image(640, 480)
    Image.fromarray(image).save(tmp_path / "a.png")
    grey = image[..., 0].copy()
    for given, want in [(tmp_path / "a.png", image), (Image.fromarray(image), image), (grey, grey)]:
        got = device_pixels(gpu, gpu.tile(given, TWELVE))
        assert np.array_equal(bits(got), bits(preprocess_image(want, TWELVE)))


def test_float16_engine_input(host_device):
    gpu = DevicePreprocessor(host_device, np.float16)
    image = synthetic_image(700, 400)
    got = device_pixels(gpu, gpu.tile(image, TWELVE))
    assert got.dtype == np.float16
    assert np.array_equal(bits(got), bits(preprocess_image(image, TWELVE).astype(np.float16)))


def _views(seed=0):
    sizes = [(800, 450), (640, 360), (896, 448), (1000, 400), (500, 700), (1600, 900)]
    return {cam: synthetic_image(w, h, seed=seed + k) for k, (cam, (w, h)) in enumerate(zip(CAMERA_ORDER, sizes))}


def test_driving_views_with_labels_equal_the_host_path(host_device):
    views, gpu = _views(), DevicePreprocessor(host_device, np.float32)
    got = device_pixels(gpu, gpu.tile_driving(views, "BGR", TWELVE))
    assert np.array_equal(bits(got), bits(HostPreprocessor().tile_driving(views, "BGR", TWELVE)))


def test_driving_six_view_kernel_path(host_device):
    views, gpu = _views(), DevicePreprocessor(host_device, np.float32)
    views["CAM_BACK"] = Image.fromarray(views["CAM_BACK"])  # decoded on the host as RGB, the rest stay BGR
    got = device_pixels(gpu, gpu.tile_driving(views, "BGR", TWELVE, draw_labels=False))
    want = preprocess_image(assemble_views(views, "BGR", draw_labels=False), TWELVE)
    assert got.shape == want.shape == (13, 3, 448, 448)
    assert np.array_equal(bits(got), bits(want))


# -- the chat cache key -------------------------------------------------------------------------------------

def test_cache_key(host_device, tmp_path):
    gpu = DevicePreprocessor(host_device, np.float32)
    image = synthetic_image(640, 480)
    Image.fromarray(image).save(tmp_path / "a.png")
    key = gpu.content_key(gpu.tile(image, TWELVE))
    assert gpu.content_key(gpu.tile(image.copy(), TWELVE)) == key
    assert gpu.content_key(gpu.tile(tmp_path / "a.png", TWELVE)) == key  # decoded to the same RGB bytes
    changed = image.copy()
    changed[0, 0, 0] ^= 1
    others = [gpu.tile(changed, TWELVE), gpu.tile(image, TilingConfig(max_tiles=6)), gpu.tile(image, TWELVE, "BGR"),
              DevicePreprocessor(host_device, np.float16).tile(image, TWELVE)]
    assert len({key, *(gpu.content_key(t) for t in others)}) == 5


# -- the whole pipeline -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(qwen2_export, host_device):
    host = EdgeVL.from_pretrained(qwen2_export, preprocess="cpu")
    device = EdgeVL.from_pretrained(qwen2_export, preprocess="cpu")
    device.preprocessor = DevicePreprocessor(host_device, device.backend.vision_input_dtype)
    return host, device


def _host_tiles(pixels: np.ndarray) -> DeviceTiles:
    """Host memory standing in for device memory (ONNX Runtime on CPU binds the address in place)."""
    return DeviceTiles(SimpleNamespace(ptr=pixels.ctypes.data, keep=pixels), pixels.shape, pixels.dtype, (), "")


def test_device_tiles_equal_host_arrays_across_chunks(pair):
    _, device = pair
    backend = device.backend
    pixels = preprocess_image(synthetic_image(900, 500), TWELVE)  # 3 tiles
    want = backend.encode_images(pixels)  # one tile per run on CPU
    saved, backend.vision_batch = backend.vision_batch, 2  # runs of 2 + 1: the pointer offsets are exercised
    try:
        got = backend.encode_images(_host_tiles(pixels))
    finally:
        backend.vision_batch = saved
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="device tiles are float16"):
        backend.encode_images(_host_tiles(pixels[:1].astype(np.float16)))


@pytest.mark.parametrize("images", [
    pytest.param(lambda: [synthetic_image(900, 500, seed=1)], id="one-image"),
    pytest.param(lambda: [synthetic_image(900, 460, seed=2), synthetic_image(450, 880, seed=3)[..., ::-1]],
                 id="two-images"),
    pytest.param(lambda: _views(7), id="driving"),
])
def test_generate_tokens_equal_host_tiling(pair, host_device, images):
    host, device = pair
    before = host_device.launches
    want = host.generate("Describe the scene.", images(), channel_order="BGR", max_new_tokens=8)
    got = device.generate("Describe the scene.", images(), channel_order="BGR", max_new_tokens=8)
    assert host_device.launches > before
    assert got.token_ids == want.token_ids
    assert got.tiles_per_image == want.tiles_per_image and got.prompt_tokens == want.prompt_tokens


def test_chat_reuses_device_encoded_images(pair):
    _, device = pair
    device.reset_chat()
    image = synthetic_image(448, 448, seed=5)  # one tile each: the three turns fit the tiny max_seq
    first = device.chat("What is this?", image, max_new_tokens=4)
    second = device.chat("And this one?", [image.copy(), synthetic_image(300, 300)], max_new_tokens=4)
    device.reset_chat()
    assert first.timings.images_encoded == 1
    assert second.timings.images_encoded == 1 and second.timings.vision_cache_hits == 2


# -- on a GPU -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_kernels():
    try:
        from edgevl.kernels.launch import CudaKernels, NoCudaDevice
    except ImportError as e:
        pytest.skip(f"GPU check: cuda-python is not installed ({e})")
    try:
        return CudaKernels()
    except (ImportError, NoCudaDevice) as e:
        pytest.skip(f"GPU check: no CUDA device ({e})")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gpu_device_tiles_equal_preprocess_image(cuda_kernels, dtype):
    gpu = DevicePreprocessor(cuda_kernels, dtype)
    for size, order in [((1920, 1080), "BGR"), ((3840, 2160), "RGB"), ((333, 1200), "BGR")]:
        image = np.random.default_rng(size[0]).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        got = device_pixels(gpu, gpu.tile(image, TWELVE, order))
        assert np.array_equal(bits(got), bits(preprocess_image(image, TWELVE, order).astype(dtype)))
    views = _views(3)
    got = device_pixels(gpu, gpu.tile_driving(views, "RGB", TWELVE, draw_labels=False))
    want = preprocess_image(assemble_views(views, "RGB", draw_labels=False), TWELVE).astype(dtype)
    assert np.array_equal(bits(got), bits(want))


def test_gpu_onnxruntime_cuda_generate_equals_host_tiling(cuda_kernels, qwen2_export):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("GPU check: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    device = EdgeVL.from_pretrained(qwen2_export, device="cuda")
    assert device.preprocessor.name == "gpu"
    host = EdgeVL.from_pretrained(qwen2_export, device="cuda", preprocess="cpu")
    for images in ([synthetic_image(1920, 1080)], _views(1)):
        want = host.generate("Describe.", images, max_new_tokens=8)
        assert device.generate("Describe.", images, max_new_tokens=8).token_ids == want.token_ids
