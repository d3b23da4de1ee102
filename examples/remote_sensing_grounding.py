"""Remote-sensing grounding: ask for the box of a described object, parse `<ref>..</ref><box>[[..]]</box>`
into pixel boxes and draw them; ask about a region given as a pixel box.

    python examples/remote_sensing_grounding.py [--model DIR] [--out boxes.png]
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from edgevl import EdgeVL
from edgevl.formats.grounding import detection_prompt, draw_boxes, parse_boxes, region_prompt
from edgevl.testing.examples import model_dir_or_tiny, parse_example_args
from edgevl.synthetic import synthetic_image


def main(argv=None) -> int:
    args = parse_example_args(__doc__, argv)
    with tempfile.TemporaryDirectory(prefix="edgevl-example-") as work:
        model = EdgeVL.from_pretrained(model_dir_or_tiny(args.model, Path(work)))
        image = synthetic_image(800, 800, seed=3)  # stands in for an aerial tile
        height, width = image.shape[:2]
        prompt = detection_prompt("the storage tank at the top left")
        result = model.generate(prompt, image, max_new_tokens=args.max_new_tokens)
        print(f"detection prompt: {prompt}\nanswer: {result.text!r}")
        parsed = parse_boxes(result.text, width, height)
        print(f"boxes parsed from the model's answer: {parsed.boxes} (problems: {parsed.problems})")
        crafted = "<ref>storage tank</ref><box>[[120, 80, 360, 300]]</box>"  # what a trained model writes
        boxes = parse_boxes(crafted, width, height).boxes
        print(f"boxes from a crafted answer, in pixels: {[b.xyxy for b in boxes]}")
        out = Path(work) / "boxes.png"
        draw_boxes(image, boxes).save(out)
        print(f"drew {len(boxes)} box(es) -> {out} (temporary)")
        question = region_prompt(boxes[0].xyxy, width, height)
        result = model.generate(question, image, max_new_tokens=args.max_new_tokens)
        print(f"region prompt: {question}\nanswer: {result.text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
