"""An export's memory and progress: the process's peak RSS for each stage's log line, freed memory handed back to
the OS between stages, and progress with an ETA for the per-tensor and per-tile loops."""
from __future__ import annotations

import ctypes
import gc
import importlib
import os
import pickle
import signal
import sys
import time
import traceback
from contextlib import contextmanager

from edgevl.cpu import process_memory_bytes

GIB = 1 << 30
LOG_INTERVAL_S = 5.0


def peak_rss_bytes() -> int | None:
    return process_memory_bytes("VmHWM")


def current_rss_bytes() -> int | None:
    return process_memory_bytes("VmRSS")


# Per finished child process: this process's RSS when it started the child plus the child's own peak.
_overlapping_peaks: list[int] = []


def export_peak_rss_bytes() -> int | None:
    """The most this process and the stage processes it ran (stage_processes) held at one time: its own peak,
    or a child's peak on top of what this process held while waiting for it, whichever is larger."""
    own = peak_rss_bytes()
    return max([own, *_overlapping_peaks]) if own is not None else None


# What every export stage imports, loaded once by the helper its processes fork from: torch and its ONNX exporter
# cost ~10 s to import, paid once per export instead of once per stage. A name a torch release moves is skipped.
_STAGE_MODULES = ["torch", "torch._dynamo", "torch.export._trace", "torch.onnx._internal.exporter._core", "onnxscript",
                  "edgevl.checkpoint", "edgevl.backends.torch_backend", "edgevl.export.graphs"]


@contextmanager
def stage_processes():
    """Yield run(function, *args) -> function(*args), run in a process of its own that holds nothing of this one's
    memory: forked from a helper process, spawned here, that has only imported _STAGE_MODULES. Each stage's
    memory is returned whole when its process exits; the helper's (~0.4 GB) when the block ends. Every process
    dies with the one that started it (Linux), so a killed export leaves none writing into its directory. A stage
    process that ends without an answer (killed for memory, crashed) raises RuntimeError saying how it ended; an
    exception it raised is raised here, with its traceback as the cause."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    helper = context.Process(target=_helper, args=(theirs, os.getpid()), name="edgevl-export-stages")
    helper.start()
    theirs.close()

    def run(function, *args):
        before = current_rss_bytes() or 0
        try:
            ours.send((function, args))
            how, value, child_peak = ours.recv()
        except (EOFError, ConnectionError):  # the helper itself is gone
            helper.join()
            how, value = "ended", helper.exitcode
        if how == "ended":
            raise RuntimeError(f"the process running {function.__name__} ended without an answer: "
                               f"{_how_it_ended(value)}")
        if how == "raised":
            exception, remote_traceback = value
            raise exception from RuntimeError(f"in the process running {function.__name__}:\n{remote_traceback}")
        _overlapping_peaks.append(before + (child_peak or 0))
        return value

    try:
        yield run
    except BaseException:
        helper.terminate()  # its stage process, if one runs (Ctrl-C), dies with it
        raise
    finally:
        ours.close()  # an idle helper exits at EOF
        helper.join()


def _helper(conn, exporter_pid: int) -> None:
    """stage_processes' helper: import the stage modules, then fork one process per (function, args) received and
    send back ("returned", value, its peak RSS), ("raised", (exception, traceback text), None) or ("ended",
    exit code, None)."""
    import multiprocessing

    _die_with_parent(exporter_pid)
    for name in _STAGE_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    fork = multiprocessing.get_context("fork")  # this process has no threads to break
    while True:
        try:
            function, args = conn.recv()
        except EOFError:
            return
        receive, send = fork.Pipe(duplex=False)
        stage = fork.Process(target=_stage, args=(send, os.getpid(), function, args), name=function.__name__)
        stage.start()
        send.close()
        try:
            answer = receive.recv()
        except EOFError:
            answer = None
        receive.close()
        stage.join()
        conn.send(answer if answer is not None and stage.exitcode == 0 else ("ended", stage.exitcode, None))


def _stage(send, helper_pid: int, function, args) -> None:
    _die_with_parent(helper_pid)
    send.send(_answer(function, args))  # an answer that does not pickle: the traceback, exit code 1


def _answer(function, args) -> tuple:
    try:
        return "returned", function(*args), peak_rss_bytes()
    except Exception as e:  # noqa: BLE001  raised again in the exporting process
        text = traceback.format_exc()
        try:
            pickle.dumps(e)
        except Exception:  # noqa: BLE001  an exception that does not pickle: its text instead
            e = RuntimeError(f"{type(e).__name__}: {e}")
        return "raised", (e, text), None


def _die_with_parent(parent_pid: int) -> None:
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(1)


_PR_SET_PDEATHSIG = 1


def _how_it_ended(exitcode: int) -> str:
    if exitcode == -signal.SIGKILL:
        return ("killed by SIGKILL, most often the kernel's out-of-memory killer (`dmesg` names it); the export's "
                f"peak so far was {(export_peak_rss_bytes() or 0) / GIB:.1f} GiB")
    if exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return (f"exit code {exitcode}, its error above (a script that calls export_model needs "
            "`if __name__ == \"__main__\":` around the call: the process imports the script first)")


def release_memory() -> None:
    """Collect garbage, then have glibc return free heap pages to the OS: a stage's many large numpy and protobuf
    buffers leave free chunks inside the heap, which would otherwise stay resident into the next stage."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def progress(items, total: int, desc: str, log=print):
    """Yield `items`, showing progress with an ETA: a tqdm bar on a terminal, else a `log` line every ~10% of
    the items, at most one per LOG_INTERVAL_S."""
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            yield from tqdm(items, total=total, desc=f"[export] {desc}", leave=False, mininterval=1.0)
            return
    start = last = time.perf_counter()
    step = max(1, total // 10)
    for done, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if done % step == 0 and done < total and now - last >= LOG_INTERVAL_S:
            last, elapsed = now, now - start
            log(f"[export] {desc}: {done}/{total}, {elapsed:.0f} s, ETA {elapsed * (total - done) / done:.0f} s")
