"""CPU preprocessing against the InternVL reference port, and the numpy Pillow-resize reference."""

from __future__ import annotations

import numpy as np
import PIL
import pytest
from PIL import Image

import internvl_reference as ref
from edgevl.preprocess import ImageError, TilingConfig, num_tiles, preprocess_image, tile_grid
from edgevl.resample import bicubic_coefficients, resize_bicubic, vertical_pass_first


def random_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def oracle_grid(width: int, height: int, config: TilingConfig) -> tuple[int, int]:
    ratios = ref.target_ratios_for(config.min_tiles, config.max_tiles)
    return ref.find_closest_aspect_ratio(width / height, ratios, width, height, config.image_size)


def oracle_pixels(image: Image.Image, config: TilingConfig) -> np.ndarray:
    return ref.pixel_values(image, config.min_tiles, config.max_tiles, config.image_size, config.use_thumbnail)


def assert_matches_oracle(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.flags.c_contiguous
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.array_equal(got, want), "expected bit-identical values (same float32 ops as the reference)"


# --- tiling -------------------------------------------------------------------------------------

GRID_CONFIGS = [
    TilingConfig(),
    TilingConfig(max_tiles=6),
    TilingConfig(min_tiles=2, max_tiles=12),
    TilingConfig(min_tiles=4, max_tiles=4),
    TilingConfig(max_tiles=40),
    TilingConfig(max_tiles=1),
    TilingConfig(image_size=224, max_tiles=9, use_thumbnail=False),
]
SWEEP = sorted(set(range(1, 4001, 89)) | {2, 447, 448, 449, 640, 895, 896, 897, 1080, 1344, 1920, 4000})
EXTREMES = [(4000, 50), (50, 4000), (4000, 1), (1, 4000), (1, 1), (12, 1), (1, 12), (3000, 7), (7, 3000)]


@pytest.mark.parametrize("config", GRID_CONFIGS, ids=repr)
def test_tile_grid_and_num_tiles_match_reference_on_size_sweep(config):
    sizes = [(w, h) for w in SWEEP for h in SWEEP] + EXTREMES
    wrong = [(w, h) for w, h in sizes if tile_grid(w, h, config) != oracle_grid(w, h, config)]
    assert wrong == []
    for w, h in sizes[::7] + EXTREMES:
        cols, rows = oracle_grid(w, h, config)
        # The reference appends the thumbnail only when the crops are not a single tile.
        assert num_tiles(w, h, config) == cols * rows + (config.use_thumbnail and cols * rows != 1)


@pytest.mark.parametrize(
    "size, config, grid",
    [
        # 1.25 is exactly halfway between ratio 1 ((1,1), (2,2)) and 1.5 ((3,2)) when 4:3 is out of
        # range: the image's area decides how far up the equidistant grids it climbs.
        ((500, 400), TilingConfig(max_tiles=6), (1, 1)),
        ((800, 640), TilingConfig(max_tiles=6), (2, 2)),
        ((1250, 1000), TilingConfig(max_tiles=6), (3, 2)),
        # Square images: every n x n grid ties at ratio 1.
        ((448, 448), TilingConfig(), (1, 1)),
        ((800, 800), TilingConfig(), (2, 2)),
        ((1000, 1000), TilingConfig(), (3, 3)),
        # Equal-area tie (ratio 4 vs 1 at aspect 2.5): the reference's set order puts (4, 1) first.
        ((1000, 400), TilingConfig(min_tiles=4, max_tiles=4), (4, 1)),
        ((1250, 500), TilingConfig(min_tiles=4, max_tiles=4), (2, 2)),
    ],
)
def test_tie_break_cases(size, config, grid):
    assert oracle_grid(*size, config) == grid
    assert tile_grid(*size, config) == grid


def test_tie_break_depends_on_area():
    config = TilingConfig(max_tiles=6)
    small, large = tile_grid(500, 400, config), tile_grid(1250, 1000, config)
    assert small == oracle_grid(500, 400, config) and large == oracle_grid(1250, 1000, config)
    assert small != large


def test_tiling_config_validation():
    for bad in (dict(min_tiles=0), dict(min_tiles=5, max_tiles=4), dict(image_size=0)):
        with pytest.raises(ValueError, match="TilingConfig"):
            TilingConfig(**bad)
    with pytest.raises(ValueError, match="0x10"):
        tile_grid(0, 10, TilingConfig())


# --- preprocess_image vs the reference ----------------------------------------------------------

PARITY_CASES = [
    ((100, 80), TilingConfig()),  # small, upscaled to a 4x3 grid
    ((448, 448), TilingConfig()),  # exact: Pillow's same-size copy path, no thumbnail
    ((896, 448), TilingConfig()),  # 2x1 grid at the original size, plus thumbnail
    ((1920, 1080), TilingConfig()),  # downscale to 4x2 + thumbnail
    ((300, 1000), TilingConfig()),  # tall: the thumbnail resize takes Pillow 13's vertical-first order
    ((4000, 50), TilingConfig()),  # extreme aspect ratio
    ((1000, 600), TilingConfig(use_thumbnail=False)),
    ((1000, 700), TilingConfig(max_tiles=6)),
    ((640, 400), TilingConfig(max_tiles=40)),  # 8x5 = 40 tiles
    ((500, 500), TilingConfig(min_tiles=2)),
    ((640, 480), TilingConfig(image_size=224, max_tiles=6)),
]


@pytest.mark.parametrize("size, config", PARITY_CASES, ids=lambda v: repr(v))
def test_preprocess_matches_reference(size, config):
    rgb = random_rgb(*size, seed=size[0] + size[1])
    got = preprocess_image(rgb, config)
    assert got.shape[0] == num_tiles(*size, config)
    assert_matches_oracle(got, oracle_pixels(Image.fromarray(rgb), config))


def test_input_kinds_agree_with_reference(tmp_path):
    rgb = random_rgb(700, 500, seed=7)
    want = oracle_pixels(Image.fromarray(rgb), TilingConfig())
    png = tmp_path / "image.png"
    Image.fromarray(rgb).save(png)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    bgr_before = bgr.copy()

    assert_matches_oracle(preprocess_image(png), want)
    assert_matches_oracle(preprocess_image(str(png)), want)
    assert_matches_oracle(preprocess_image(Image.fromarray(rgb)), want)
    assert_matches_oracle(preprocess_image(rgb), want)
    assert_matches_oracle(preprocess_image(bgr, channel_order="BGR"), want)
    assert np.array_equal(bgr, bgr_before), "the caller's array must not be modified"
    # Strided views work too (a BGR view of the RGB array, read as BGR, is the original image).
    assert_matches_oracle(preprocess_image(rgb[..., ::-1], channel_order="BGR"), want)


def test_jpeg_path_matches_reference_load_image(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(random_rgb(1024, 768, seed=3)).save(path, quality=90)
    assert_matches_oracle(preprocess_image(path, TilingConfig(max_tiles=6)), ref.load_image(path, max_num=6))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_non_rgb_pil_modes_convert_like_reference(mode):
    image = Image.fromarray(random_rgb(600, 400, seed=11)).convert(mode)
    assert_matches_oracle(preprocess_image(image), oracle_pixels(image.convert("RGB"), TilingConfig()))


def test_grayscale_array_is_replicated_to_rgb():
    gray = random_rgb(600, 400, seed=5)[..., 0].copy()
    want = oracle_pixels(Image.fromarray(gray).convert("RGB"), TilingConfig())
    assert_matches_oracle(preprocess_image(gray), want)
    assert_matches_oracle(preprocess_image(gray, channel_order="BGR"), want)


def test_sixteen_bit_images_keep_their_high_byte(tmp_path):
    """A 16-bit grayscale PNG is seen as its 8-bit image (Pillow's convert("RGB") would clip it near white), the
    way Pillow decodes 16-bit RGB PNGs; uint16 arrays likewise, in both channel orders."""
    gray16 = (random_rgb(600, 400, seed=7)[..., 0].astype(np.uint16) * 257 + 100).astype(np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(gray16).save(path)
    assert Image.open(path).mode == "I;16"
    want = oracle_pixels(Image.fromarray((gray16 >> 8).astype(np.uint8)).convert("RGB"), TilingConfig())
    assert_matches_oracle(preprocess_image(path), want)
    assert_matches_oracle(preprocess_image(Image.open(path)), want)
    assert_matches_oracle(preprocess_image(gray16), want)
    rgb16 = random_rgb(600, 400, seed=8).astype(np.uint16) * 257
    want = oracle_pixels(Image.fromarray(random_rgb(600, 400, seed=8)), TilingConfig())
    assert_matches_oracle(preprocess_image(rgb16), want)
    assert_matches_oracle(preprocess_image(np.ascontiguousarray(rgb16[..., ::-1]), channel_order="BGR"), want)


@pytest.mark.parametrize("mode", ["I", "F"])
def test_images_of_unknown_range_are_refused(mode):
    with pytest.raises(ImageError, match=f"mode {mode}"):
        preprocess_image(Image.new(mode, (64, 64)))


def test_oracle_normalisation_matches_torch():
    torch = pytest.importorskip("torch")
    values = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    image = Image.fromarray(values)
    # torchvision's ToTensor and Normalize, op for op.
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean = torch.as_tensor(ref.IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.as_tensor(ref.IMAGENET_STD, dtype=torch.float32)[:, None, None]
    want = x.sub(mean).div(std).numpy()
    assert np.array_equal(ref.build_transform(16)(image), want)


# --- bad input ----------------------------------------------------------------------------------


def test_missing_path_names_the_file(tmp_path):
    path = tmp_path / "missing.jpg"
    with pytest.raises(ImageError, match="not found") as e:
        preprocess_image(path)
    assert str(path) in str(e.value)


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg" * 20)
    whole = tmp_path / "whole.jpg"
    Image.fromarray(random_rgb(256, 256)).save(whole)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(whole.read_bytes()[:2000])
    for path in (garbage, truncated):
        with pytest.raises(ImageError) as e:
            preprocess_image(path)
        assert str(path) in str(e.value)
    with Image.open(truncated) as lazy, pytest.raises(ImageError, match="mode RGB"):
        preprocess_image(lazy)  # header parses; the decode error surfaces as ImageError too


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((10, 10, 3), dtype=np.float32),
        np.zeros((10, 10, 4), dtype=np.uint8),
        np.zeros((2, 0), dtype=np.uint8),
        np.zeros((0, 5, 3), dtype=np.uint8),
        np.zeros((2, 2, 2, 3), dtype=np.uint8),
        np.zeros(12, dtype=np.uint8),
    ],
    ids=lambda a: f"{a.shape}-{a.dtype}",
)
def test_bad_arrays_name_shape_and_dtype(array):
    with pytest.raises(ImageError) as e:
        preprocess_image(array)
    assert str(array.shape) in str(e.value) and str(array.dtype) in str(e.value)


def test_bad_channel_order_and_input_type():
    with pytest.raises(ValueError, match="RGBA"):
        preprocess_image(random_rgb(8, 8), channel_order="RGBA")
    with pytest.raises(ImageError, match="list"):
        preprocess_image([[0, 0, 0]])


# --- numpy reference of Pillow's BICUBIC resize -------------------------------------------------

RESIZE_CASES = [
    ((640, 480), (1344, 896)),  # upscale both
    ((300, 200), (120, 70)),  # downscale both, horizontal first
    ((57, 281), (55, 13)),  # downscale both, Pillow 13 goes vertical first
    ((37, 1000), (448, 448)),  # width up, height down: vertical first
    ((300, 200), (300, 50)),  # vertical only
    ((300, 200), (77, 200)),  # horizontal only
    ((1, 1), (5, 7)),
    ((7, 5), (1, 1)),
    ((1, 50), (3, 9)),
    ((50, 1), (9, 3)),
    ((4000, 50), (448, 448)),  # 40x horizontal shrink: 81-tap kernel
    ((13, 17), (13, 17)),  # same size: a copy
    ((3840, 2160), (1344, 896)),
]


@pytest.mark.parametrize("src, dst", RESIZE_CASES, ids=str)
def test_resize_bicubic_is_bit_exact_with_pillow(src, dst):
    rgb = random_rgb(*src, seed=src[0] * 7 + dst[1])
    want = np.asarray(Image.fromarray(rgb).resize(dst, Image.BICUBIC))
    got = resize_bicubic(rgb, *dst)
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert np.array_equal(got, want)


def test_resize_bicubic_random_sizes_and_single_channel():
    rng = np.random.default_rng(42)
    for _ in range(40):
        w, h, ow, oh = (int(v) for v in rng.integers(1, 160, 4))
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = np.asarray(Image.fromarray(rgb).resize((ow, oh), Image.BICUBIC))
        assert np.array_equal(resize_bicubic(rgb, ow, oh), want), (w, h, ow, oh)
    gray = rng.integers(0, 256, (90, 70), dtype=np.uint8)
    want = np.asarray(Image.fromarray(gray).resize((31, 120), Image.BICUBIC))
    assert np.array_equal(resize_bicubic(gray[..., None], 31, 120)[..., 0], want)


def test_pass_order_follows_installed_pillow():
    # Without the right order these would be off by one in hundreds of pixels (see RESIZE_CASES).
    expect_vertical = int(PIL.__version__.split(".")[0]) >= 13
    assert vertical_pass_first(57, 281, 55, 13) is expect_vertical
    assert vertical_pass_first(300, 1000, 448, 448) is expect_vertical
    assert vertical_pass_first(3840, 2160, 1344, 896) is False
    assert vertical_pass_first(100, 80, 1792, 1344) is False


def test_bicubic_coefficients_layout():
    bounds, weights = bicubic_coefficients(3840, 1344)
    assert bounds.dtype == np.int32 and weights.dtype == np.int32
    assert bounds.shape == (1344, 2) and weights.shape == (1344, 13)  # ceil(2 * 2.857) * 2 + 1
    assert bounds[:, 0].min() == 0 and (bounds[:, 0] + bounds[:, 1]).max() == 3840
    taps = np.arange(weights.shape[1])[None, :]
    assert np.all(weights[taps >= bounds[:, 1:]] == 0)
    # Rounded 22-bit weights sum to 1.0 within one unit per tap.
    assert np.all(np.abs(weights.sum(axis=1) - (1 << 22)) <= bounds[:, 1])
    # Same size is the identity: one full-weight tap on the matching source pixel.
    bounds, weights = bicubic_coefficients(9, 9)
    picked = weights[np.arange(9), np.arange(9) - bounds[:, 0]]
    assert np.all(picked == 1 << 22) and weights.sum() == 9 << 22
