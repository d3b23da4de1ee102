"""Multi-view driving input (six nuScenes cameras in one image) and DriveLM object tags.

Reference: OpenGVLab/InternVL internvl_chat/tools/images_stitching.py (custom_image), which builds the
stitched images Mini-InternVL's DriveLM adaptation trains and evaluates on:
    captions = ["CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT"]
    each view img.resize((896, 448)) (Pillow's default filter, BICUBIC), pasted row-major into 3 x 2 -> 2688 x 896,
    and its camera name drawn at (0, 0) in magenta, DejaVuSans-Bold size 50.
Object tags: internvl_chat/eval/domain_specific/drivelm/evaluate.py post_process() reads
`<c1,CAM_FRONT,[cx,cy]>` with cx, cy in 0-1000 of the whole stitched image and maps them to pixels of the
1600 x 900 camera image: cx / 1000 * 2688 - column * 896, then / 896 * 1600, clamped to the image.
The camera names in the prompt (camera_prompt) are edgevl's wording: the reference's questions carry no
text prefix that we could find; the labels it trains on are the ones drawn into the image.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CAMERA_ORDER = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT")
VIEW_WIDTH, VIEW_HEIGHT = 896, 448
COLUMNS, ROWS = 3, 2
ASSEMBLED_WIDTH, ASSEMBLED_HEIGHT = VIEW_WIDTH * COLUMNS, VIEW_HEIGHT * ROWS  # 2688 x 896
NUSCENES_CAMERA_SIZE = (1600, 900)  # what the reference's post_process assumes for every camera
NORMALIZED_MAX = 1000
_LABEL_COLOR, _LABEL_FONT_SIZE = (255, 0, 255), 50
_LABEL_FONTS = ("/usr/share/fonts/dejavu/DejaVuSans-Bold.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")


def _cell(camera: str) -> tuple[int, int]:
    if camera not in CAMERA_ORDER:
        raise ValueError(f"unknown camera {camera!r}: expected one of {', '.join(CAMERA_ORDER)}")
    index = CAMERA_ORDER.index(camera)
    return index % COLUMNS, index // COLUMNS


def check_cameras(names) -> None:
    names = list(names)
    missing = [c for c in CAMERA_ORDER if c not in names]
    unknown = [n for n in names if n not in CAMERA_ORDER]
    if missing or unknown:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                ([f"unknown {', '.join(map(repr, unknown))}"] if unknown else [])
        raise ValueError(f"driving views: {'; '.join(parts)}. Pass exactly the six cameras "
                         f"{', '.join(CAMERA_ORDER)} as a dict {{camera: image}}")


def _label_font():
    for path in _LABEL_FONTS:
        if Path(path).is_file():
            return ImageFont.truetype(path, _LABEL_FONT_SIZE)
    return ImageFont.load_default(size=_LABEL_FONT_SIZE)  # Pillow >= 10.1; same size, different glyphs


def assemble_views(views: dict, channel_order: str = "RGB", draw_labels: bool = False) -> np.ndarray:
    """The six camera views as one 2688 x 896 RGB uint8 array [896, 2688, 3]: each resized to 896 x 448
    (Pillow BICUBIC), row-major in CAMERA_ORDER. draw_labels=True also writes each camera's name into its
    view as the reference stitching does (magenta, DejaVuSans-Bold 50 at the top left)."""
    from ..preprocess import image_threads, load_image

    if not isinstance(views, dict):
        raise ValueError(f"driving views: expected a dict {{camera: image}}, got {type(views).__name__}")
    check_cameras(views)
    out = np.empty((ASSEMBLED_HEIGHT, ASSEMBLED_WIDTH, 3), dtype=np.uint8)
    font = _label_font() if draw_labels else None
    one_label_at_a_time = threading.Lock()  # the views share one FreeType face, which is not thread-safe
    # One PIL image may stand for several cameras, and loading it is not thread-safe: PIL images are loaded here,
    # paths (decoded in the threads) and arrays in place.
    sources = {camera: load_image(image) if isinstance(image, Image.Image) else image
               for camera, image in views.items()}

    def place(camera):
        source = sources[camera]
        image = source if isinstance(source, Image.Image) else load_image(source, channel_order)
        view = image.resize((VIEW_WIDTH, VIEW_HEIGHT), Image.BICUBIC)
        if font is not None:
            with one_label_at_a_time:
                ImageDraw.Draw(view).text((0, 0), camera, fill=_LABEL_COLOR, font=font)
        col, row = _cell(camera)
        out[row * VIEW_HEIGHT:(row + 1) * VIEW_HEIGHT, col * VIEW_WIDTH:(col + 1) * VIEW_WIDTH] = np.asarray(view)

    with image_threads() as pool:  # the six views side by side
        for done in [pool.submit(place, camera) for camera in CAMERA_ORDER]:
            done.result()
    return out


def camera_prompt() -> str:
    """The text that tells the model where each camera sits in the assembled image."""
    rows = [", ".join(CAMERA_ORDER[r * COLUMNS:(r + 1) * COLUMNS]) for r in range(ROWS)]
    return (f"The image stitches six camera views in a 3x2 grid. Top row, left to right: {rows[0]}. "
            f"Bottom row, left to right: {rows[1]}.\n")


def driving_query(prompt: str) -> str:
    return camera_prompt() + prompt


# -- coordinates -----------------------------------------------------------------------------------------------

def _check_size(size, what: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"{what}={size!r}: expected (width, height) in pixels") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"{what}={size!r}: width and height must be positive")
    return w, h


def view_to_assembled(camera: str, x: float, y: float, view_size=NUSCENES_CAMERA_SIZE) -> tuple[float, float]:
    """Pixel (x, y) of `camera`'s own image (view_size = its width, height) -> 0-1000 of the assembled image."""
    col, row = _cell(camera)
    w, h = _check_size(view_size, "view_size")
    ax = col * VIEW_WIDTH + x / w * VIEW_WIDTH
    ay = row * VIEW_HEIGHT + y / h * VIEW_HEIGHT
    return ax / ASSEMBLED_WIDTH * NORMALIZED_MAX, ay / ASSEMBLED_HEIGHT * NORMALIZED_MAX


def assembled_to_view(camera: str, nx: float, ny: float, view_size=NUSCENES_CAMERA_SIZE) -> tuple[float, float]:
    """0-1000 of the assembled image -> pixel (x, y) of `camera`'s image, clamped to it (as the reference)."""
    col, row = _cell(camera)
    w, h = _check_size(view_size, "view_size")
    x = (nx / NORMALIZED_MAX * ASSEMBLED_WIDTH - col * VIEW_WIDTH) / VIEW_WIDTH * w
    y = (ny / NORMALIZED_MAX * ASSEMBLED_HEIGHT - row * VIEW_HEIGHT) / VIEW_HEIGHT * h
    return min(max(x, 0.0), float(w)), min(max(y, 0.0), float(h))


# -- DriveLM object tags ---------------------------------------------------------------------------------------

_NUMBER = r"-?\d*\.?\d+"
# The reference's pattern (evaluate.py post_process), with spaces allowed around the camera too.
_NORMALIZED_TAG = re.compile(rf"<\s*(c[^,<>]*?)\s*,\s*([A-Z_]+)\s*,\s*\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]\s*>")
# DriveLM's own pixel form: <c1,CAM_BACK,1088.3,497.5>
_PIXEL_TAG = re.compile(rf"<\s*(c[^,<>]*?)\s*,\s*([A-Z_]+)\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*>")


@dataclass(frozen=True)
class ObjectTag:
    tag: str  # "c1"
    camera: str
    x: float
    y: float
    span: tuple[int, int]  # where it was in the text


def parse_object_tags(text: str, normalized: bool = True) -> list[ObjectTag]:
    """`<c1,CAM_FRONT,[cx,cy]>` tags (normalized=True) or DriveLM's `<c1,CAM_FRONT,x,y>` (False), in order.
    Malformed tags are not matched; nothing raises on model output."""
    if not isinstance(text, str):
        return []
    pattern = _NORMALIZED_TAG if normalized else _PIXEL_TAG
    return [ObjectTag(m.group(1), m.group(2), float(m.group(3)), float(m.group(4)), m.span())
            for m in pattern.finditer(text)]


def format_object_tag(tag: str, camera: str, x: float, y: float, normalized: bool = True) -> str:
    """`<c1,CAM_FRONT,[x,y]>` (0-1000, one decimal) or DriveLM's pixel `<c1,CAM_FRONT,x,y>` (one decimal)."""
    _cell(camera)
    x, y = round(float(x), 1), round(float(y), 1)
    return f"<{tag},{camera},[{x:g},{y:g}]>" if normalized else f"<{tag},{camera},{x:g},{y:g}>"


def _camera_size(camera_sizes, camera: str):
    if camera_sizes is None:
        return NUSCENES_CAMERA_SIZE
    if isinstance(camera_sizes, dict):
        if camera not in camera_sizes:
            raise ValueError(f"camera_sizes has no entry for {camera!r}: give (width, height) for every camera used")
        return camera_sizes[camera]
    return camera_sizes


def tags_to_pixels(text: str, camera_sizes=None) -> str:
    """Rewrite an answer's 0-1000 tags as DriveLM pixel tags of each camera image (the reference's
    post_process); camera_sizes: (w, h) for all cameras, a dict per camera, or None for 1600 x 900.
    Tags naming an unknown camera are left as they are."""
    return _rewrite(text, _NORMALIZED_TAG, camera_sizes, lambda t, size: format_object_tag(
        t.tag, t.camera, *assembled_to_view(t.camera, t.x, t.y, size), normalized=False))


def tags_to_normalized(text: str, camera_sizes=None) -> str:
    """Rewrite DriveLM pixel tags in a question as the 0-1000 tags of the assembled image the model reads."""
    return _rewrite(text, _PIXEL_TAG, camera_sizes, lambda t, size: format_object_tag(
        t.tag, t.camera, *view_to_assembled(t.camera, t.x, t.y, size), normalized=True))


def _rewrite(text: str, pattern, camera_sizes, convert) -> str:
    pieces, last = [], 0
    for m in pattern.finditer(text):
        tag = ObjectTag(m.group(1), m.group(2), float(m.group(3)), float(m.group(4)), m.span())
        if tag.camera not in CAMERA_ORDER:
            continue
        pieces += [text[last:m.start()], convert(tag, _camera_size(camera_sizes, tag.camera))]
        last = m.end()
    return "".join(pieces) + text[last:]
