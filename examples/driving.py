"""Multi-view driving: six nuScenes-style camera views -> one 2688x896 image (12 tiles + thumbnail) with the
camera names in the prompt, as Mini-InternVL's DriveLM adaptation reads them; object tags converted to pixels.

    python examples/driving.py [--model DIR]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from edgevl import EdgeVL
from edgevl.formats.driving import CAMERA_ORDER, parse_object_tags, tags_to_normalized, tags_to_pixels
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


def main(argv=None) -> int:
    args = _parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edgevl-example-") as work:
        model = EdgeVL.from_pretrained(_model_dir(args.model, Path(work)))
        views = {camera: synthetic_image(1600, 900, seed=i) for i, camera in enumerate(CAMERA_ORDER)}
        # DriveLM questions name objects by pixel position in one camera; the model reads 0-1000 of the stitch.
        question = tags_to_normalized("What is the status of <c1,CAM_FRONT,800.0,450.0>? Answer briefly.")
        print(f"question: {question}")
        result = model.generate(question, views, max_new_tokens=args.max_new_tokens)
        print(f"answer: {result.text!r}")
        print(f"tiles per image: {result.tiles_per_image} (12 tiles + thumbnail), prompt tokens: {result.prompt_tokens}")
        answer = "There is a car at <c2,CAM_BACK,[500.0,750.0]> behind the ego vehicle."  # a crafted answer
        print(f"tags in a crafted answer: {[(t.tag, t.camera, t.x, t.y) for t in parse_object_tags(answer)]}")
        print(f"as DriveLM pixel tags (1600x900 cameras): {tags_to_pixels(answer)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
