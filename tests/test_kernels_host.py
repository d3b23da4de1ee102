"""Host build of kernels/*.cu (g++ -x c++ via kernels/cuda_compat.cuh): every launch is emulated thread
by thread through the same __global__ and __host__ __device__ functions the GPU runs, and compared with
the numpy / Pillow reference. No GPU needed."""

import numpy as np
import pytest
import torch

from edgevl.modeling import pixel_shuffle
from edgevl.preprocess import TilingConfig, preprocess_image
from edgevl.resample import resize_bicubic, vertical_pass_first
from edgevl.kernels.host_build import HostKernels, build_host_library, find_host_compiler
from edgevl.kernels.tile_plan import DRIVING_CANVAS_SIZE, DRIVING_VIEW_SIZE, plan_tiles


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    if find_host_compiler() is None:
        pytest.skip("no host C++ compiler (g++, clang++ or c++) on PATH to build kernels/host_emulation.cpp")
    return HostKernels(build_host_library(tmp_path_factory.mktemp("kernels")))


def pitched_image(rng, w, h, pixel_bytes=3, pad_bytes=0):
    """A [h, w, 3] uint8 view into rows of w * pixel_bytes + pad_bytes bytes; the padding and any
    4th channel hold random junk the kernel must never read into the result."""
    pitch = w * pixel_bytes + pad_bytes
    buf = rng.integers(0, 256, (h, pitch), dtype=np.uint8)
    return buf[:, : w * pixel_bytes].reshape(h, w, pixel_bytes)[:, :, :3]


def as_bits(a):
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint16)


# (w, h): squares, both orientations, odd sizes, extreme aspect ratios, up- and down-scaling, and
# shapes whose resizes take Pillow 13's vertical-first order.
SIZES = [
    (64, 64), (65, 97), (448, 448), (449, 447), (640, 480), (480, 640), (1024, 768), (1280, 720),
    (333, 1500), (1500, 333), (2000, 120), (120, 2000), (1000, 1000), (1366, 768), (1920, 1080), (1080, 1920),
]


@pytest.mark.parametrize("w,h", SIZES)
@pytest.mark.parametrize("channel_order", ["RGB", "BGR"])
def test_tiles_bit_identical_to_preprocess(kernels, w, h, channel_order):
    rng = np.random.default_rng(w * 7919 + h)
    img = pitched_image(rng, w, h, pad_bytes=13)
    got = kernels.assemble_tiles(img, channel_order=channel_order)
    want = preprocess_image(np.ascontiguousarray(img), channel_order=channel_order)
    assert got.shape == want.shape
    assert np.array_equal(as_bits(got), as_bits(want)), f"{w}x{h} {channel_order}: {np.sum(got != want)} elements differ"


def test_sizes_cover_both_pass_orders():
    orders = set()
    for w, h in SIZES:
        for plan, _ in plan_tiles(w, h)[1]:
            orders.add(vertical_pass_first(plan.in_w, plan.in_h, plan.out_w, plan.out_h))
    assert orders == {True, False}


def test_4k_frame_bgr_with_four_byte_pixels(kernels):
    rng = np.random.default_rng(4)
    # A 4K camera frame as BGRA rows padded to a 256-byte pitch; alpha and padding are junk.
    img = pitched_image(rng, 3840, 2160, pixel_bytes=4, pad_bytes=256 - (3840 * 4) % 256)
    got = kernels.assemble_tiles(img, channel_order="BGR")
    want = preprocess_image(np.ascontiguousarray(img), channel_order="BGR")
    assert np.array_equal(as_bits(got), as_bits(want))


@pytest.mark.parametrize("w,h", [(640, 480), (333, 1500)])
def test_fp16_output_is_fp32_output_cast(kernels, w, h):
    img = pitched_image(np.random.default_rng(16), w, h, pad_bytes=5)
    got16 = kernels.assemble_tiles(img, dtype=np.float16)
    want = kernels.assemble_tiles(img).astype(np.float16)
    assert got16.dtype == np.float16
    assert np.array_equal(as_bits(got16), as_bits(want))


@pytest.mark.parametrize("config", [TilingConfig(image_size=224, max_tiles=6), TilingConfig(use_thumbnail=False),
                                    TilingConfig(min_tiles=4, max_tiles=8)])
def test_other_tiling_configs(kernels, config):
    img = pitched_image(np.random.default_rng(1), 900, 500)
    got = kernels.assemble_tiles(img, config)
    want = preprocess_image(np.ascontiguousarray(img), config)
    assert np.array_equal(as_bits(got), as_bits(want))


def test_six_camera_layout(kernels):
    rng = np.random.default_rng(6)
    sizes = [(800, 450), (800, 450), (640, 360), (896, 448), (1000, 400), (500, 700)]
    views = [pitched_image(rng, w, h, pad_bytes=3) for w, h in sizes]
    got = kernels.assemble_driving_views(views, channel_order="BGR")
    view_w, view_h = DRIVING_VIEW_SIZE
    canvas = np.empty((DRIVING_CANVAS_SIZE[1], DRIVING_CANVAS_SIZE[0], 3), dtype=np.uint8)
    for k, view in enumerate(views):
        rgb = np.ascontiguousarray(view[..., ::-1])
        canvas[(k // 3) * view_h:(k // 3 + 1) * view_h, (k % 3) * view_w:(k % 3 + 1) * view_w] = resize_bicubic(rgb, view_w, view_h)
    want = preprocess_image(canvas)
    assert got.shape == want.shape == (13, 3, 448, 448)
    assert np.array_equal(as_bits(got), as_bits(want))


@pytest.mark.parametrize("ps_version", ["v1", "v2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pixel_shuffle_bit_exact(kernels, ps_version, dtype):
    x = torch.randn(3, 1024, 24, generator=torch.Generator().manual_seed(0)).to(dtype)
    want = pixel_shuffle(x.reshape(3, 32, 32, 24), 0.5, ps_version).reshape(3, 256, 96)
    got = kernels.pixel_shuffle(x.numpy(), ps_version)
    assert np.array_equal(got, want.contiguous().numpy())


@pytest.mark.parametrize("ps_version", ["v1", "v2"])
def test_pixel_shuffle_layernorm_within_1e5(kernels, ps_version):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1024, 1024, generator=g) * 3 + 0.5
    weight, bias = torch.randn(4096, generator=g), torch.randn(4096, generator=g)
    shuffled = pixel_shuffle(x.reshape(2, 32, 32, 1024), 0.5, ps_version).reshape(2, 256, 4096)
    want = torch.nn.functional.layer_norm(shuffled, (4096,), weight, bias, eps=1e-5)
    got = kernels.pixel_shuffle_layernorm(x.numpy(), weight.numpy(), bias.numpy(), 1e-5, ps_version)
    assert np.abs(got - want.numpy()).max() < 1e-5
