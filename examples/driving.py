"""Multi-view driving: six nuScenes-style camera views -> one 2688x896 image (12 tiles + thumbnail) with the
camera names in the prompt, as Mini-InternVL's DriveLM adaptation reads them; object tags converted to pixels.

    python examples/driving.py [--model DIR]
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from edgevl import EdgeVL
from edgevl.formats.driving import CAMERA_ORDER, parse_object_tags, tags_to_normalized, tags_to_pixels
from edgevl.testing.examples import model_dir_or_tiny, parse_example_args
from edgevl.synthetic import synthetic_image


def main(argv=None) -> int:
    args = parse_example_args(__doc__, argv)
    with tempfile.TemporaryDirectory(prefix="edgevl-example-") as work:
        model = EdgeVL.from_pretrained(model_dir_or_tiny(args.model, Path(work)))
        views = {camera: synthetic_image(1600, 900, seed=i) for i, camera in enumerate(CAMERA_ORDER)}
        # DriveLM questions name objects by pixel position in one camera; the model reads 0-1000 of the stitch.
        question = tags_to_normalized("What is the status of <c1,CAM_FRONT,800.0,450.0>? Answer briefly.")
        print(f"question: {question}")
        result = model.generate(question, views, max_new_tokens=args.max_new_tokens)
        print(f"answer: {result.text!r}")
        print(f"tiles per image: {result.tiles_per_image} (12 tiles + thumbnail), "
              f"prompt tokens: {result.prompt_tokens}")
        answer = "There is a car at <c2,CAM_BACK,[500.0,750.0]> behind the ego vehicle."  # a crafted answer
        print(f"tags in a crafted answer: {[(t.tag, t.camera, t.x, t.y) for t in parse_object_tags(answer)]}")
        print(f"as DriveLM pixel tags (1600x900 cameras): {tags_to_pixels(answer)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
