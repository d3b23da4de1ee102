"""The kernels on a real GPU against the CPU reference; skipped without a CUDA driver and device."""

import numpy as np
import pytest

from edgevl.preprocess import preprocess_image


def _kernels_or_none():
    try:
        from edgevl.kernels.launch import CudaKernels, NoCudaDevice
    except ImportError:
        return None, "cuda-python is not installed"
    try:
        return CudaKernels(), None
    except (ImportError, NoCudaDevice) as e:
        return None, str(e)


@pytest.fixture(scope="module")
def cuda():
    kernels, why = _kernels_or_none()
    if kernels is None:
        pytest.skip(f"no CUDA device ({why})")
    return kernels


def test_no_driver_error_is_actionable():
    kernels, why = _kernels_or_none()
    if kernels is not None:
        pytest.skip("a CUDA device is present; the no-driver message is not reachable")
    if why == "cuda-python is not installed":
        pytest.skip(why)
    assert "GPU tiling needs an NVIDIA GPU; use preprocess='cpu'" in why


@pytest.mark.parametrize("w,h", [(64, 64), (333, 1500), (1500, 333), (640, 480), (1920, 1080), (3840, 2160)])
@pytest.mark.parametrize("channel_order", ["RGB", "BGR"])
def test_gpu_tiles_match_preprocess(cuda, w, h, channel_order):
    img = np.random.default_rng(w + h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    got = cuda.assemble_tiles_numpy(img, channel_order=channel_order)
    want = preprocess_image(img, channel_order=channel_order)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    got16 = cuda.assemble_tiles_numpy(img, channel_order=channel_order, fp16=True)
    assert np.array_equal(got16.view(np.uint16), want.astype(np.float16).view(np.uint16))


def test_gpu_six_camera_layout(cuda):
    from edgevl.kernels.host_build import HostKernels, build_host_library, find_host_compiler

    if find_host_compiler() is None:
        pytest.skip("no host C++ compiler for the host reference of the six-camera layout")
    rng = np.random.default_rng(6)
    views = [rng.integers(0, 256, (900, 1600, 3), dtype=np.uint8) for _ in range(6)]
    want = HostKernels(build_host_library()).assemble_driving_views(views)  # checked against numpy in test_kernels_host
    assert np.array_equal(cuda.assemble_driving_views_numpy(views), want)


@pytest.mark.parametrize("ps_version", ["v1", "v2"])
def test_gpu_pixel_shuffle(cuda, ps_version):
    torch = pytest.importorskip("torch")
    from edgevl.modeling import pixel_shuffle

    x = torch.randn(4, 1024, 1024, generator=torch.Generator().manual_seed(0))
    shuffled = pixel_shuffle(x.reshape(4, 32, 32, 1024), 0.5, ps_version).reshape(4, 256, 4096)
    xs, y = cuda.upload(x.numpy()), cuda.alloc(x.numel() * 4)
    cuda.pixel_shuffle(xs.ptr, y.ptr, 4, 32, 1024, ps_version)
    assert np.array_equal(cuda.download(y, (4, 256, 4096), np.float32), shuffled.numpy())

    weight, bias = torch.randn(4096), torch.randn(4096)
    want = torch.nn.functional.layer_norm(shuffled, (4096,), weight, bias, eps=1e-5)
    wd, bd = cuda.upload(weight.numpy()), cuda.upload(bias.numpy())
    cuda.pixel_shuffle_layernorm(xs.ptr, wd.ptr, bd.ptr, 1e-5, y.ptr, 4, 32, 1024, ps_version)
    assert np.abs(cuda.download(y, (4, 256, 4096), np.float32) - want.numpy()).max() < 1e-5
