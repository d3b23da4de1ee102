"""The domain examples run end to end on the tiny random model and say that the weights are random."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name", ["driving", "remote_sensing_grounding", "video"])
def test_example_runs(name, capsys):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM-weight" in out and "answer:" in out
