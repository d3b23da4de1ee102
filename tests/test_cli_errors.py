"""Every error the CLI can raise is one line naming the flag or file, never a traceback (--debug shows it);
missing extras name the extra; demo and selftest leave no temporary directory behind; a selftest that ran
nothing fails."""
from __future__ import annotations

import sys
import tempfile

import pytest

from edgevl.cli import main
from edgevl.errors import SettingError
from edgevl.generation import GenerationConfig


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("flag, value, words", [
    ("--max-new-tokens", "0", "must be an integer >= 1"),
    ("--seed", "-1", "must be an integer >= 0"),
    ("--top-p", "0.0", "must be in (0, 1]"),
])
def test_generation_settings_name_the_flag(capsys, tiny_checkpoint, flag, value, words):
    line = _error(capsys, ["generate", "--model", str(tiny_checkpoint("qwen2")), "--prompt", "Hi", flag, value])
    assert line.startswith(f"edgevl generate: error: {flag} {value}: ") and words in line
    assert "GenerationConfig" not in line


def test_python_api_names_the_parameter():
    with pytest.raises(SettingError, match=r"GenerationConfig.seed=-1 is invalid"):
        GenerationConfig(seed=-1)


def test_export_settings_name_the_flag(capsys, tiny_checkpoint, tmp_path):
    line = _error(capsys, ["export", "--model", str(tiny_checkpoint("qwen2")), "--out", str(tmp_path / "x"),
                           "--max-seq", "0"])
    assert line.startswith("edgevl export: error: --max-seq 0: expected 1..")
    assert not (tmp_path / "x").exists()


def test_max_seq_and_device_of_generate(capsys, tiny_checkpoint):
    checkpoint = str(tiny_checkpoint("qwen2"))
    line = _error(capsys, ["generate", "--model", checkpoint, "--prompt", "Hi", "--max-seq", "0"])
    assert "--max-seq 0: must be between 1 and the model's context" in line
    import torch

    if not torch.cuda.is_available():
        line = _error(capsys, ["generate", "--model", checkpoint, "--prompt", "Hi", "--device", "cuda"])
        assert "--device cuda: this PyTorch" in line and "sees no CUDA GPU" in line


def test_debug_shows_the_traceback(tiny_checkpoint):
    with pytest.raises(SettingError):
        main(["generate", "--model", str(tiny_checkpoint("qwen2")), "--prompt", "Hi", "--max-new-tokens", "0",
              "--debug"])


def test_missing_extras_name_the_extra(capsys, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as in an install without the [export] extra
    line = _error(capsys, ["export", "--model", str(tiny_checkpoint("qwen2")), "--out", str(tmp_path / "x")])
    assert "pip install 'edgevl[export]'" in line
    monkeypatch.setitem(sys.modules, "cv2", None)
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00")
    line = _error(capsys, ["generate", "--model", str(tiny_checkpoint("qwen2")), "--prompt", "Hi",
                           "--video", str(video)])
    assert "pip install 'edgevl[video]'" in line


def test_demo_and_selftest_remove_their_temporary_directories(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["demo", "--max-new-tokens", "2"]) == 0
    from edgevl.selftest import selftest

    selftest(["kernels"], families=["qwen2"], log=lambda _: None)  # makes its work directory all the same
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("edgevl-")]  # (torch caches its own here)


def test_a_selftest_that_ran_nothing_fails(capsys, monkeypatch):
    import edgevl.selftest as st

    monkeypatch.setattr(st, "_unavailable_reasons", lambda kept: {b: "not here" for b in st.BACKENDS})
    assert main(["selftest"]) == 1
    out = capsys.readouterr().out
    assert "0 passed, 0 failed" in out and "FAIL (no check could run here" in out
