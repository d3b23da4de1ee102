"""Multi-view driving: the 2688x896 layout, camera checks, DriveLM tags, and end to end on a tiny model."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgevl import EdgeVL
from edgevl.formats.driving import (CAMERA_ORDER, assemble_views, assembled_to_view, format_object_tag,
                                    parse_object_tags, tags_to_normalized, tags_to_pixels, view_to_assembled)
from edgevl.synthetic import synthetic_image


def _views(size=(1600, 900)):
    return {cam: synthetic_image(*size, seed=i) for i, cam in enumerate(CAMERA_ORDER)}


def test_layout_matches_a_direct_composition_pixel_by_pixel():
    views = _views((320, 180))
    expected = Image.new("RGB", (2688, 896))
    positions = {"CAM_FRONT_LEFT": (0, 0), "CAM_FRONT": (896, 0), "CAM_FRONT_RIGHT": (1792, 0),
                 "CAM_BACK_LEFT": (0, 448), "CAM_BACK": (896, 448), "CAM_BACK_RIGHT": (1792, 448)}
    for cam, xy in positions.items():
        expected.paste(Image.fromarray(views[cam]).resize((896, 448), Image.BICUBIC), xy)
    shuffled = dict(reversed(list(views.items())))  # dict order must not matter
    assembled = assemble_views(shuffled)
    assert assembled.shape == (896, 2688, 3) and assembled.dtype == np.uint8
    np.testing.assert_array_equal(assembled, np.asarray(expected))


def test_bgr_views_and_drawn_labels():
    views = _views((200, 100))
    bgr = {cam: v[..., ::-1].copy() for cam, v in views.items()}
    np.testing.assert_array_equal(assemble_views(bgr, "BGR"), assemble_views(views))
    labelled = assemble_views(views, draw_labels=True)
    plain = assemble_views(views)
    assert (labelled[:60, :400] != plain[:60, :400]).any()  # the name is written at each view's top left
    np.testing.assert_array_equal(labelled[300:448, 600:896], plain[300:448, 600:896])


def test_one_lazily_opened_image_for_every_camera_is_each_cameras_view(tmp_path):
    """The views are resized on threads: a PIL image file opened once and passed for all six cameras is decoded once,
    not by six threads at the same time, and gives what the six paths give."""
    path = tmp_path / "view.png"
    Image.fromarray(_views((320, 180))["CAM_FRONT"]).save(path)
    with Image.open(path) as image:  # not decoded yet
        shared = assemble_views({cam: image for cam in CAMERA_ORDER}, draw_labels=True)
    np.testing.assert_array_equal(shared, assemble_views({cam: path for cam in CAMERA_ORDER}, draw_labels=True))


@pytest.mark.parametrize("change, words", [
    (lambda v: v.pop("CAM_BACK"), ["missing CAM_BACK"]),
    (lambda v: v.update(CAM_TOP=v["CAM_FRONT"]), ["unknown 'CAM_TOP'"]),
    (lambda v: (v.pop("CAM_FRONT"), v.update(cam_front=1)), ["missing CAM_FRONT", "unknown 'cam_front'"]),
])
def test_missing_and_unknown_cameras_are_named(change, words):
    views = _views((64, 36))
    change(views)
    with pytest.raises(ValueError) as e:
        assemble_views(views)
    assert all(w in str(e.value) for w in words)


@pytest.mark.parametrize("size", [(1600, 900), (1920, 1080), (640, 360), (333, 777)])
def test_view_and_assembled_coordinates_round_trip(size):
    rng = np.random.default_rng(0)
    for cam in CAMERA_ORDER:
        for x, y in rng.uniform(0, 1, (20, 2)) * size:
            nx, ny = view_to_assembled(cam, x, y, size)
            assert 0 <= nx <= 1000 and 0 <= ny <= 1000
            bx, by = assembled_to_view(cam, nx, ny, size)
            assert abs(bx - x) < 1e-6 and abs(by - y) < 1e-6


def test_reference_post_process_numbers():
    # evaluate.py: cx/1000*2688 - mx*896, /896*1600 -- CAM_BACK is column 1, row 1.
    x, y = assembled_to_view("CAM_BACK", 500, 750)
    assert (x, y) == pytest.approx(((1344 - 896) / 896 * 1600, (672 - 448) / 448 * 900))
    assert assembled_to_view("CAM_FRONT", 10, 10) == (0.0, pytest.approx(10 / 1000 * 896 / 448 * 900))  # clamped x


def test_tags_parse_format_and_convert_both_ways():
    answer = "There is <c1,CAM_FRONT,[500,250]> and < c2 , CAM_BACK_LEFT , [ 100.5 , 700 ] > ahead."
    tags = parse_object_tags(answer)
    assert [(t.tag, t.camera, t.x, t.y) for t in tags] == [("c1", "CAM_FRONT", 500, 250),
                                                           ("c2", "CAM_BACK_LEFT", 100.5, 700)]
    pixels = tags_to_pixels(answer)
    assert parse_object_tags(pixels) == [] and len(parse_object_tags(pixels, normalized=False)) == 2
    back = parse_object_tags(tags_to_normalized(pixels))
    for a, b in zip(tags, back):
        assert (a.tag, a.camera) == (b.tag, b.camera)
        assert abs(a.x - b.x) <= 0.05 + 1e-9 and abs(a.y - b.y) <= 0.05 + 1e-9
    assert format_object_tag("c3", "CAM_FRONT", 12.345, 6) == "<c3,CAM_FRONT,[12.3,6]>"


def test_tags_with_camera_sizes_and_malformed_text():
    question = "Is <c1,CAM_FRONT_RIGHT,800,450> moving?"
    converted = tags_to_normalized(question, {"CAM_FRONT_RIGHT": (1600, 900)})
    (tag,) = parse_object_tags(converted)
    assert tag.camera == "CAM_FRONT_RIGHT" and tag.x == pytest.approx(2 / 3 * 1000 + 1000 / 6, abs=0.05)
    with pytest.raises(ValueError, match="CAM_FRONT_RIGHT"):
        tags_to_normalized(question, {"CAM_FRONT": (1600, 900)})
    for junk in ["<c1,CAM_FRONT,[abc,1]>", "<c1,CAM_FRONT,[1,2>", "<c1,CAM_NOPE,[1,2]>", "", None]:
        parsed = parse_object_tags(junk)
        assert all(t.camera == "CAM_NOPE" for t in parsed)
        if isinstance(junk, str):
            assert tags_to_pixels(junk) == junk


def test_driving_generate_end_to_end(tiny_checkpoint, monkeypatch):
    import edgevl.api

    model = EdgeVL.from_pretrained(tiny_checkpoint("qwen2"))
    rendered, encoded = [], []
    render = edgevl.api.render_prompt
    monkeypatch.setattr(edgevl.api, "render_prompt", lambda *a, **k: rendered.append(render(*a, **k)) or rendered[-1])
    encode = model.backend.encode_images
    monkeypatch.setattr(model.backend, "encode_images", lambda pv: encoded.append(pv.shape) or encode(pv))
    result = model.generate("What is ahead?", _views((320, 180)), max_new_tokens=3)
    assert result.tiles_per_image == [13] and encoded == [(13, 3, 448, 448)]
    assert result.prompt_tokens > 13 * 256
    (text,) = rendered
    assert text.count("<image>") == 1 and all(cam in text for cam in CAMERA_ORDER)
    assert text.index("<image>") < text.index("CAM_FRONT_LEFT") < text.index("What is ahead?")


def test_chat_reuses_embeddings_of_an_image_seen_before(tiny_checkpoint, monkeypatch):
    model = EdgeVL.from_pretrained(tiny_checkpoint("qwen2"))
    encoded = []
    encode = model.backend.encode_images
    monkeypatch.setattr(model.backend, "encode_images", lambda pv: encoded.append(pv.shape[0]) or encode(pv))
    views = _views((320, 180))
    model.reset_chat()
    first = model.chat("What is ahead?", views, max_new_tokens=2)
    assert (first.timings.images_encoded, first.timings.vision_cache_hits) == (1, 0)
    again = model.chat("And now?", views, max_new_tokens=2)  # same cameras again: same pixels, same tiles
    assert (again.timings.images_encoded, again.timings.vision_cache_hits) == (0, 2)
    follow_up = model.chat("Anything else?", max_new_tokens=2)
    assert (follow_up.timings.images_encoded, follow_up.timings.vision_cache_hits) == (0, 2)
    assert encoded == [13]
    model.reset_chat()
    assert model.generate("x", views, max_new_tokens=1).timings.images_encoded == 1  # generate keeps no cache
    assert encoded == [13, 13]
