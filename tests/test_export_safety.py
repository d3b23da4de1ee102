"""`edgevl export` as a transaction: bad arguments and killed runs never cost the previous export, directories
that are not exports are never deleted, partial directories are recognised, temporary directories go away."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
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
STAGES = ["[export] vision.onnx", "[export] decoder.onnx", "[export] vision int8", "[export] drift against fp32"]


def test_sigkill_at_any_stage_keeps_the_previous_export(previous, tiny_checkpoint):
    """A real `edgevl export` process, stopped (SIGSTOP) as it enters each stage, which leaves the disk as a SIGKILL
    there would: the previous export still verifies; SIGKILL at the last stage, and it still runs; the next export
    succeeds and clears what the killed one left."""
    before = _snapshot(previous)
    command = [sys.executable, "-u", "-m", "edgevl.cli", "export", "--model", str(tiny_checkpoint("qwen2")),
               "--out", str(previous), "--precision", "int8"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen, stages = [], iter(STAGES)
    stage = next(stages)
    for line in process.stdout:
        seen.append(line)
        if line.startswith(stage):
            process.send_signal(signal.SIGSTOP)
            assert _snapshot(previous) == before, stage
            read_manifest(previous)  # sizes and checksums
            stage = next(stages, None)
            if stage is None:
                process.send_signal(signal.SIGKILL)
                break
            process.send_signal(signal.SIGCONT)
    process.wait(timeout=120)
    assert process.returncode == -signal.SIGKILL, f"never reached {stage!r}: {''.join(seen)}"
    assert _snapshot(previous) == before
    assert EdgeVL.from_pretrained(previous).generate("Hi", max_new_tokens=2).token_ids
    assert _leftovers(previous)  # the killed run could not clean up after itself...
    assert main(["export", "--model", str(tiny_checkpoint("qwen2")), "--out", str(previous),
                 "--precision", "int8"]) == 0
    assert not _leftovers(previous)  # ...the next export does
    assert read_manifest(previous).precision.decoder == "int8"


def test_ctrl_c_ends_an_export_at_once_and_cleans_up(previous, tiny_checkpoint):
    """SIGINT to the whole process group (a terminal's Ctrl-C) during a torch export stage: `edgevl export` exits
    130 within seconds, its stage processes and partial directory are gone, the previous export is untouched."""
    before = _snapshot(previous)
    process = subprocess.Popen([sys.executable, "-u", "-m", "edgevl.cli", "export", "--model",
                                str(tiny_checkpoint("qwen2")), "--out", str(previous)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not inherited ignored
    left = None
    for line in process.stdout:
        if line.startswith("[export] decoder.onnx"):
            time.sleep(2)  # into the stage's torch export
            left = _descendants(process.pid)
            os.killpg(process.pid, signal.SIGINT)
            break
    assert left is not None, "the export never reached decoder.onnx"
    assert process.wait(timeout=30) == 130 and "edgevl export: interrupted" in process.stdout.read()
    deadline = time.monotonic() + 10
    while any(p.is_running() for p in left):
        assert time.monotonic() < deadline, "stage processes outlived the interrupted export"
        time.sleep(0.1)
    assert _snapshot(previous) == before and not _leftovers(previous)


def test_a_killed_export_leaves_no_stage_process_behind():
    """The process an export stage runs in, and the helper it forks from, exit when the exporting process is killed."""
    exporter = subprocess.Popen([sys.executable, "-c", "import time\nfrom edgevl.export.memory import stage_processes"
                                 "\nif __name__ == '__main__':\n    with stage_processes() as run:\n"
                                 "        run(time.sleep, 600)"])
    deadline = time.monotonic() + 120
    while not any(p.ppid() != exporter.pid for p in _descendants(exporter.pid)):  # exporter -> helper -> stage
        assert time.monotonic() < deadline and exporter.poll() is None, "the stage process never started"
        time.sleep(0.2)
    left = _descendants(exporter.pid)
    exporter.kill()
    exporter.wait()
    deadline = time.monotonic() + 10
    while left := [p for p in left if p.is_running()]:
        assert time.monotonic() < deadline, f"still running after the exporter was killed: {left}"
        time.sleep(0.1)


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def test_a_stage_process_answers_raises_or_says_how_it_died():
    from edgevl.export.memory import stage_processes

    with stage_processes() as run:
        assert run(max, 3, 7) == 7
        with pytest.raises(ValueError, match="invalid literal") as raised:
            run(int, "seven")
        assert "in the process running int" in str(raised.value.__cause__)  # with the stage process's traceback
        with pytest.raises(RuntimeError, match="running raise_signal ended without an answer: killed by SIGKILL, "
                                               "most often the kernel's out-of-memory killer"):
            run(signal.raise_signal, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="killed by SIGSEGV"):
            run(signal.raise_signal, signal.SIGSEGV)
        assert run(min, 3, 7) == 3  # the helper outlives its stage processes' ends
