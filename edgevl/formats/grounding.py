"""Grounding answers and prompts: `<ref>text</ref><box>[[x1, y1, x2, y2], ...]</box>`, coordinates 0-1000.

InternVL's convention (README grounding examples, eval/refcoco/evaluate_grounding.py): the model writes
box corners normalised to 0-1000 of the original image, and pixel = coord / 1000 * width (or height).
Prompts, as InternVL's grounding data writes them:
- detection: "Please provide the bounding box coordinate of the region this sentence describes: <ref>…</ref>"
  (the commented-out prefix in internvl_chat/eval/domain_specific/rs_det/evaluate.py, and the RefCOCO
  instruction of InternVL's grounding data);
- region: "Please provide a short description for this region: <box>[[x1, y1, x2, y2]]</box>" (the
  region-caption instruction of the VG/RefCOCO data InternVL inherits; not found verbatim in an OpenGVLab
  file here, so treat the wording as an assumption; the box syntax is InternVL's).
Model output is never trusted: parse_boxes() skips or clamps what it cannot read and lists why.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

NORMALIZED_MAX = 1000
DETECTION_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: <ref>{text}</ref>"
REGION_PROMPT = "Please provide a short description for this region: {box}"

_TAG = re.compile(r"<(/?)(ref|box)>")
_LIST = re.compile(r"\[([^\[\]]*)\]")


@dataclass(frozen=True)
class Box:
    """A box in pixels of the original image; label is the <ref> text before it (None without one)."""

    label: str | None
    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)


@dataclass
class GroundingResult:
    boxes: list[Box] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what was skipped or clamped, and why


def _check_size(width, height) -> None:
    integers = isinstance(width, (int, np.integer)) and isinstance(height, (int, np.integer))
    if not (integers and width > 0 and height > 0):
        raise ValueError(f"image size width={width!r}, height={height!r}: expected positive integers (pixels)")


# -- coordinates ---------------------------------------------------------------------------------------------

def to_normalized_box(box, width: int, height: int) -> list[int]:
    """A pixel box (x1, y1, x2, y2) as InternVL's 0-1000 integers (rounded, clipped to the image).
    Quantisation: a pixel coordinate comes back within width/2000 px (within 1 px up to 2000 px wide)."""
    _check_size(width, height)
    x1, y1, x2, y2 = _four_numbers(box, "box")
    scale = (width, height, width, height)
    return [int(min(max(round(v / s * NORMALIZED_MAX), 0), NORMALIZED_MAX)) for v, s in zip((x1, y1, x2, y2), scale)]


def to_pixel_box(box, width: int, height: int) -> tuple[float, float, float, float]:
    """0-1000 (x1, y1, x2, y2) -> pixels of a width x height image (coord / 1000 * size)."""
    _check_size(width, height)
    x1, y1, x2, y2 = _four_numbers(box, "box")
    return (x1 / NORMALIZED_MAX * width, y1 / NORMALIZED_MAX * height,
            x2 / NORMALIZED_MAX * width, y2 / NORMALIZED_MAX * height)


def _four_numbers(box, name: str) -> tuple[float, float, float, float]:
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        raise ValueError(f"{name}={box!r}: expected four numbers (x1, y1, x2, y2)") from None
    if len(values) != 4:
        raise ValueError(f"{name}={box!r}: expected four numbers (x1, y1, x2, y2), got {len(values)}")
    return tuple(values)


# -- prompts -------------------------------------------------------------------------------------------------

def detection_prompt(text: str) -> str:
    """Ask for the box of the region `text` describes; the answer is parsed by parse_boxes()."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text={text!r}: expected a non-empty description of the region to find")
    return DETECTION_PROMPT.format(text=text.strip())


def format_box(normalized_boxes) -> str:
    """`<box>[[x1, y1, x2, y2], ...]</box>` from 0-1000 integer boxes."""
    inner = ", ".join("[" + ", ".join(str(int(v)) for v in b) + "]" for b in normalized_boxes)
    return f"<box>[{inner}]</box>"


def region_prompt(box, width: int, height: int, template: str = REGION_PROMPT) -> str:
    """Ask about the region at pixel `box` of a width x height image; `template` has a {box} field."""
    if "{box}" not in template:
        raise ValueError(f"template={template!r}: needs a {{box}} field where the box goes")
    return template.format(box=format_box([to_normalized_box(box, width, height)]))


# -- parsing -------------------------------------------------------------------------------------------------

def parse_boxes(text: str, width: int, height: int) -> GroundingResult:
    """Labelled pixel boxes from a grounding answer. Tolerates spacing, several boxes per <box>, a box
    without <ref>, unclosed tags, non-numbers and out-of-range values: bad boxes are skipped, values outside
    0-1000 clamped, swapped corners reordered, each noted in `problems`. Never raises on `text`."""
    _check_size(width, height)
    result = GroundingResult()
    if not isinstance(text, str):
        result.problems.append(f"answer is {type(text).__name__}, not text: no boxes")
        return result
    label = None  # a <ref> labels every box after it up to the next <ref> (InternVL may repeat <box> tags)
    for kind, body, closed in _segments(text):
        if kind == "ref":
            label = body.strip()
            if not closed:
                result.problems.append(f"unclosed <ref>: took {label!r} up to the next tag as the label")
            continue
        if not closed:
            result.problems.append(f"unclosed <box>: read {body.strip()!r} up to the next tag or the end")
        if label is None:
            result.problems.append(f"<box>{body.strip()}</box> has no <ref> before it: label is None")
        for values in _box_lists(body, result.problems):
            box = _clamped(values, result.problems)
            if box is not None:
                result.boxes.append(Box(label, *to_pixel_box(box, width, height)))
    return result


def _segments(text: str):
    """(kind, body, closed) for each <ref>/<box> in order; an unclosed one runs to the next tag or the end."""
    tags = list(_TAG.finditer(text))
    for i, tag in enumerate(tags):
        if tag.group(1):  # a closing tag: consumed by its opener, or stray
            continue
        kind = tag.group(2)
        nxt = tags[i + 1] if i + 1 < len(tags) else None
        closed = nxt is not None and nxt.group(1) == "/" and nxt.group(2) == kind
        end = nxt.start() if nxt is not None else len(text)
        yield kind, text[tag.end():end], closed


def _box_lists(body: str, problems: list[str]) -> list[list[str]]:
    lists = _LIST.findall(body)
    if not lists and body.strip():  # "<box>10, 20, 30, 40</box>": one box without brackets
        lists = [body]
    if not lists:
        problems.append("empty <box>: skipped")
    return [[part.strip() for part in item.split(",")] for item in lists]


def _clamped(parts: list[str], problems: list[str]):
    try:
        values = [float(p) for p in parts]
    except ValueError:
        problems.append(f"box [{', '.join(parts)}] has a non-number: skipped")
        return None
    if len(values) != 4 or not all(np.isfinite(values)):
        problems.append(f"box [{', '.join(parts)}] is not four finite numbers: skipped")
        return None
    clamped = [min(max(v, 0.0), float(NORMALIZED_MAX)) for v in values]
    if clamped != values:
        problems.append(f"box {values} has coordinates outside 0-{NORMALIZED_MAX}: clamped to {clamped}")
    x1, y1, x2, y2 = clamped
    if x1 > x2 or y1 > y2:
        problems.append(f"box {clamped} has swapped corners: reordered")
        x1, x2, y1, y2 = min(x1, x2), max(x1, x2), min(y1, y2), max(y1, y2)
    return [x1, y1, x2, y2]


# -- drawing -------------------------------------------------------------------------------------------------

_COLORS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180)]


def draw_boxes(image, boxes, width_px: int = 3) -> Image.Image:
    """A copy of `image` (path, PIL image or RGB array) with each Box drawn and labelled."""
    from ..preprocess import load_image

    canvas = load_image(image).copy()
    draw = ImageDraw.Draw(canvas)
    for i, box in enumerate(boxes):
        color = _COLORS[i % len(_COLORS)]
        draw.rectangle(box.xyxy, outline=color, width=width_px)
        if box.label:
            draw.text((box.x1 + width_px, box.y1 + width_px), box.label, fill=color)
    return canvas
