"""Video: sample frames uniformly with OpenCV (InternVL's get_index), one tile per frame, `Frame1: <image>` ...

    python examples/video.py [--model DIR]
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from edgevl import EdgeVL
from edgevl.formats.video import max_frames_that_fit
from edgevl.testing.examples import model_dir_or_tiny, parse_example_args
from edgevl.synthetic import synthetic_image


def write_synthetic_clip(path: Path, num_frames: int = 24) -> Path:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 8.0, (320, 240))
    base = synthetic_image(640, 240)
    for i in range(num_frames):  # a scene panning right
        writer.write(base[:, i * 10:i * 10 + 320, ::-1].copy())
    writer.release()
    return path


def main(argv=None) -> int:
    args = parse_example_args(__doc__, argv)
    with tempfile.TemporaryDirectory(prefix="edgevl-example-") as work:
        model = EdgeVL.from_pretrained(model_dir_or_tiny(args.model, Path(work)))
        clip = write_synthetic_clip(Path(work) / "clip.avi")
        fit = max_frames_that_fit(model.backend.max_seq, model.spec.image_tokens_per_tile, args.max_new_tokens)
        print(f"context {model.backend.max_seq} tokens: up to {fit} frames fit")
        result = model.generate("Describe what happens in this video.", video=clip, num_frames=6,
                                max_new_tokens=args.max_new_tokens)
        print(f"answer: {result.text!r}")
        print(f"tiles per frame: {result.tiles_per_image}, prompt tokens: {result.prompt_tokens}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
