"""Video: sample frames uniformly with OpenCV (InternVL's get_index), one tile per frame, `Frame1: <image>` ...

    python examples/video.py [--model DIR]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from edgevl import EdgeVL
from edgevl.formats.video import max_frames_that_fit
from edgevl.testing.images import synthetic_image


def _model_dir(model, work: Path) -> Path:
    """--model, else a tiny RANDOM-weight checkpoint written to `work` (and said so)."""
    if model:
        return Path(model)
    from edgevl.testing.checkpoints import write_tiny_checkpoint

    print("NOTE: tiny RANDOM-weight model (not trained): the answers below are meaningless; the example shows "
          "the input format and the pipeline running end to end. Pass --model DIR for a real checkpoint.")
    return write_tiny_checkpoint(work / "tiny-model", family="qwen2")


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local InternVL checkpoint; default: a tiny random-weight one")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    return parser.parse_args(argv)


def write_synthetic_clip(path: Path, num_frames: int = 24) -> Path:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 8.0, (320, 240))
    base = synthetic_image(640, 240)
    for i in range(num_frames):  # a scene panning right
        writer.write(base[:, i * 10:i * 10 + 320, ::-1].copy())
    writer.release()
    return path


def main(argv=None) -> int:
    args = _parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edgevl-example-") as work:
        model = EdgeVL.from_pretrained(_model_dir(args.model, Path(work)))
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
