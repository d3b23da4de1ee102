"""`edgevl export` as a transaction: bad arguments and killed runs never cost the previous export, directories
that are not exports are never deleted, partial directories are recognised, temporary directories go away."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from edgevl import EdgeVL
from edgevl.cli import main
from edgevl.errors import SettingError
from edgevl.export import export_model
from edgevl.manifest import ExportError, read_manifest
from edgevl.specs import CheckpointError


def _snapshot(directory) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def previous(exported, tmp_path):
    """A copy of a finished fp32 export, as a user's earlier `edgevl export --out` left it."""
    out = tmp_path / "out"
    shutil.copytree(exported("qwen2"), out)
    return out


def _leftovers(out) -> list:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_bad_arguments_leave_the_previous_export_untouched(previous, tiny_checkpoint, tmp_path):
    before = _snapshot(previous)
    with pytest.raises(CheckpointError):
        export_model(tmp_path / "no-such-model", previous)
    with pytest.raises(SettingError, match="max_seq"):
        export_model(tiny_checkpoint("qwen2"), previous, max_seq=0)
    with pytest.raises(SettingError, match="max_tiles"):
        export_model(tiny_checkpoint("qwen2"), previous, max_tiles=0)
    with pytest.raises(ValueError, match="overlap"):
        export_model(previous, previous)
    assert _snapshot(previous) == before and not _leftovers(previous)


@pytest.mark.parametrize("precision, times_fp32", [("fp32", 1.1), ("int8", 1.5)])
def test_an_export_the_disk_cannot_hold_is_refused_before_it_starts(previous, tiny_checkpoint, monkeypatch,
                                                                   precision, times_fp32):
    import edgevl.export.exporter as exporter
    from edgevl.checkpoint import load_checkpoint

    weights = load_checkpoint(tiny_checkpoint("qwen2")).weights
    fp32_bytes = 4 * sum(int(np.prod(weights[name].shape)) for name in weights)  # independent of elements()
    need = int(times_fp32 * fp32_bytes)
    real = shutil.disk_usage
    free = lambda path, free: real(path)._replace(free=free)  # noqa: E731
    before = _snapshot(previous)
    monkeypatch.setattr(exporter.shutil, "disk_usage", lambda path: free(path, need - 1))
    with pytest.raises(OSError, match=rf"GB free; a {precision} export of .* needs about {need / 1e9:.1f} GB"):
        export_model(tiny_checkpoint("qwen2"), previous, precision=precision)
    assert _snapshot(previous) == before and not _leftovers(previous)
    monkeypatch.setattr(exporter.shutil, "disk_usage", lambda path: free(path, need))
    monkeypatch.setattr(exporter, "staged", lambda out: (_ for _ in ()).throw(RuntimeError("past the check")))
    with pytest.raises(RuntimeError, match="past the check"):
        export_model(tiny_checkpoint("qwen2"), previous, precision=precision)


def test_a_directory_that_is_not_an_export_is_refused_not_deleted(tiny_checkpoint, tmp_path):
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(ValueError, match="not an edgevl export; refusing to replace it"):
        export_model(tiny_checkpoint("qwen2"), precious)
    assert (precious / "holiday.jpg").read_bytes() == b"\xff\xd8 not really"
    with pytest.raises(ValueError, match="overlap"):  # the checkpoint itself, or a directory holding it
        export_model(tiny_checkpoint("qwen2"), tiny_checkpoint("qwen2").parent)


def test_a_failed_export_removes_its_partial_directory_and_keeps_the_old_one(previous, tiny_checkpoint,
                                                                             monkeypatch):
    import edgevl.export.exporter as exporter

    before = _snapshot(previous)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(exporter, "_quantize_into", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(tiny_checkpoint("qwen2"), previous, precision="int8", log=lambda _: None)
    assert _snapshot(previous) == before and not _leftovers(previous)


def test_an_interrupted_directory_is_named_as_such(exported, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(exported("qwen2"), partial)
    (partial / "manifest.json").unlink()
    with pytest.raises(ExportError, match="incomplete export"):
        EdgeVL.from_pretrained(partial)


# Lines `edgevl export` prints as it enters each stage of an int8 export.
KILL_AT = ["[export] vision.onnx", "[export] decoder.onnx", "[export] vision int8", "[export] drift against fp32"]


def test_sigkill_at_any_stage_keeps_the_previous_export(previous, tiny_checkpoint):
    """A real `edgevl export` process killed with SIGKILL as it enters each stage: the previous export still
    verifies and runs; the next export succeeds and clears what the killed ones left."""
    before = _snapshot(previous)
    command = [sys.executable, "-u", "-m", "edgevl.cli", "export", "--model", str(tiny_checkpoint("qwen2")),
               "--out", str(previous), "--precision", "int8"]
    for marker in KILL_AT:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        seen = []
        for line in process.stdout:
            seen.append(line)
            if line.startswith(marker):
                process.send_signal(signal.SIGKILL)
                break
        process.wait(timeout=120)
        assert process.returncode == -signal.SIGKILL, f"never reached {marker!r}: {''.join(seen)}"
        assert _snapshot(previous) == before, marker
        read_manifest(previous)  # sizes and checksums
    assert EdgeVL.from_pretrained(previous).generate("Hi", max_new_tokens=2).token_ids
    assert _leftovers(previous)  # the killed runs could not clean up after themselves...
    assert main(["export", "--model", str(tiny_checkpoint("qwen2")), "--out", str(previous),
                 "--precision", "int8"]) == 0
    assert not _leftovers(previous)  # ...the next export does
    assert read_manifest(previous).precision.decoder == "int8"
