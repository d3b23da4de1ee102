"""Grounding: box parsing (well-formed and malformed), prompts, round trips, drawing, end to end."""
from __future__ import annotations

import numpy as np
import pytest

from edgevl import EdgeVL
from edgevl.cli import main
from edgevl.formats.grounding import (Box, detection_prompt, draw_boxes, parse_boxes, region_prompt,
                                      to_normalized_box, to_pixel_box)
from edgevl.synthetic import synthetic_image, write_demo_image


def test_one_and_many_boxes_with_labels_in_pixels():
    text = "<ref>the red car</ref><box>[[100, 200, 300, 400]]</box> and <ref>trees</ref><box>[[0,0,500,500],[500, 500,1000,1000]]</box>"
    result = parse_boxes(text, 2000, 1000)
    assert result.problems == []
    assert result.boxes == [Box("the red car", 200, 200, 600, 400), Box("trees", 0, 0, 1000, 500),
                            Box("trees", 1000, 500, 2000, 1000)]


def test_a_ref_labels_every_box_up_to_the_next_ref():
    text = "<ref>car</ref><box>[[0, 0, 10, 10]]</box><box>[[20, 20, 30, 30]]</box><ref>bus</ref><box>[[1, 1, 2, 2]]</box>"
    assert [b.label for b in parse_boxes(text, 100, 100).boxes] == ["car", "car", "bus"]


def test_spacing_and_newlines_are_tolerated():
    text = "<ref> plane </ref>\n<box> [ [ 10 ,20,  30 , 40.5 ] ] </box>"
    (box,) = parse_boxes(text, 1000, 1000).boxes
    assert box == Box("plane", 10, 20, 30, 40.5)


@pytest.mark.parametrize("text, n_boxes, problem", [
    ("<box>[[1, 2, 3, 4]]</box>", 1, "no <ref>"),
    ("<ref>car</ref><box>[[10, 20, 30, 40]]", 1, "unclosed <box>"),
    ("<ref>car<box>[[10, 20, 30, 40]]</box>", 1, "unclosed <ref>"),
    ("<ref>car</ref><box>[[10, abc, 30, 40]]</box>", 0, "non-number"),
    ("<ref>car</ref><box>[[10, 20, 30]]</box>", 0, "not four"),
    ("<ref>car</ref><box>[[-5, 20, 1200, 40]]</box>", 1, "clamped"),
    ("<ref>car</ref><box>[[300, 400, 100, 200]]</box>", 1, "swapped"),
    ("<ref>car</ref><box></box>", 0, "empty"),
    ("<ref>car</ref><box>[[nan, 1, 2, 3]]</box>", 0, "not four finite"),
    ("<ref>car</ref><box>[[1e400, 1, 2, 3]]</box>", 0, "not four finite"),
    ("</box></ref><box>[[1, 2, 3, 4]", 1, "unclosed <box>"),
])
def test_malformed_output_never_raises_and_says_why(text, n_boxes, problem):
    result = parse_boxes(text, 640, 480)
    assert len(result.boxes) == n_boxes
    assert any(problem in p for p in result.problems), result.problems
    for box in result.boxes:
        assert 0 <= box.x1 <= box.x2 <= 640 and 0 <= box.y1 <= box.y2 <= 480


def test_garbage_never_raises():
    rng = np.random.default_rng(0)
    alphabet = list("<>/[], 0123456789.-abrefox") + ["<ref>", "</ref>", "<box>", "</box>", "[[", "]]"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet, rng.integers(0, 40)))
        parse_boxes(text, 100, 100)
    assert parse_boxes(None, 10, 10).boxes == []
    assert parse_boxes("no boxes at all", 10, 10).boxes == []


def test_clamped_values_and_labels():
    (box,) = parse_boxes("<ref>x</ref><box>[[-5, 20, 1200, 40]]</box>", 640, 480).boxes
    assert box.xyxy == (0, 20 / 1000 * 480, 640, 40 / 1000 * 480)


@pytest.mark.parametrize("width, height", [(1, 1), (7, 13), (448, 448), (640, 480), (1000, 1000), (1333, 750),
                                           (1920, 1080), (2000, 2000), (12, 1999)])
def test_pixel_to_normalized_to_pixel_within_one_pixel(width, height):
    rng = np.random.default_rng(width * 7 + height)
    for _ in range(200):
        x1, x2 = sorted(rng.uniform(0, width, 2))
        y1, y2 = sorted(rng.uniform(0, height, 2))
        normalized = to_normalized_box((x1, y1, x2, y2), width, height)
        assert all(isinstance(v, int) and 0 <= v <= 1000 for v in normalized)
        back = to_pixel_box(normalized, width, height)
        assert max(abs(a - b) for a, b in zip(back, (x1, y1, x2, y2))) <= 1.0


def test_prompts():
    assert detection_prompt(" the white ship ") == ("Please provide the bounding box coordinate of the region this "
                                                    "sentence describes: <ref>the white ship</ref>")
    prompt = region_prompt((64, 48, 320, 240), 640, 480)
    assert prompt == "Please provide a short description for this region: <box>[[100, 100, 500, 500]]</box>"
    assert parse_boxes(prompt, 640, 480).boxes[0].xyxy == (64, 48, 320, 240)
    with pytest.raises(ValueError, match="text"):
        detection_prompt("  ")
    with pytest.raises(ValueError, match="four numbers"):
        region_prompt((1, 2, 3), 10, 10)
    with pytest.raises(ValueError, match="width"):
        to_pixel_box((1, 2, 3, 4), 0, 10)


def test_draw_boxes_marks_the_box_edges():
    image = np.full((100, 200, 3), 255, np.uint8)
    drawn = np.asarray(draw_boxes(image, [Box("thing", 20, 10, 120, 80)]))
    assert drawn.shape == image.shape
    assert (drawn[10, 50] != 255).any() and (drawn[50, 20] != 255).any()
    assert (drawn[50, 70] == 255).all() and (image == 255).all()


def test_grounding_generate_and_cli_draw(tiny_checkpoint, tmp_path, capsys):
    model = EdgeVL.from_pretrained(tiny_checkpoint("qwen2"))
    prompt = detection_prompt("the largest rectangle")
    result = model.generate(prompt, synthetic_image(640, 480), max_new_tokens=4)
    assert result.tiles_per_image == [13] and result.token_ids  # 4x3 grid + thumbnail
    parse_boxes(result.text, 640, 480)  # random weights: any text, never an exception
    crafted = "<ref>the largest rectangle</ref><box>[[250, 100, 750, 900]]</box>"
    (box,) = parse_boxes(crafted, 640, 480).boxes
    assert box.xyxy == (160, 48, 480, 432)

    image = write_demo_image(tmp_path / "scene.png", 320, 240)
    out = tmp_path / "boxes.png"
    code = main(["generate", "--model", str(tiny_checkpoint("qwen2")), "--image", str(image), "--prompt", prompt,
                 "--max-new-tokens", "3", "--draw", str(out)])
    assert code == 0 and out.is_file()
    assert "box(es)" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_checkpoint("qwen2")), "--prompt", "x", "--draw", str(out)]) == 2
