"""What every script under examples/ shares: a --model argument, and a tiny random-weight model (said so)
when none is given, so each example runs anywhere."""
from __future__ import annotations

import argparse
from pathlib import Path


def parse_example_args(doc: str, argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local InternVL checkpoint; default: a tiny random-weight one")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    return parser.parse_args(argv)


def model_dir_or_tiny(model, work: Path) -> Path:
    """--model, else a tiny RANDOM-weight checkpoint written to `work`."""
    if model:
        return Path(model)
    from .checkpoints import write_tiny_checkpoint

    print("NOTE: tiny RANDOM-weight model (not trained): the answers below are meaningless; the example shows "
          "the input format and the pipeline running end to end. Pass --model DIR for a real checkpoint.")
    return write_tiny_checkpoint(Path(work) / "tiny-model", family="qwen2")
