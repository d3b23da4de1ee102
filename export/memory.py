"""An export's memory and progress: the process's peak RSS for each stage's log line, freed memory handed back to
the OS between stages, and progress with an ETA for the per-tensor and per-tile loops."""
from __future__ import annotations

import ctypes
import gc
import os
import pickle
import select
import signal
import sys
import threading
import time
import traceback

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
    """The most this process and the children it ran through run_in_subprocess held at one time: its own peak,
    or a child's peak on top of what this process held while waiting for it, whichever is larger."""
    own = peak_rss_bytes()
    return max([own, *_overlapping_peaks]) if own is not None else None


# What every export stage imports, loaded once by the fork server its processes start from: torch and its ONNX
# exporter cost ~10 s to import, paid once per exporting process instead of once per stage. Names that a torch
# release moves are skipped by the fork server (ImportError), costing only that time.
_STAGE_MODULES = ["torch", "torch._dynamo", "torch.export._trace", "torch.onnx._internal.exporter._core", "onnxscript",
                  "edgevl.checkpoint", "edgevl.backends.torch_backend", "edgevl.export.graphs"]


def run_in_subprocess(function, *args):
    """function(*args) in a new process that holds nothing of this one's memory: forked from a fork server that has
    only imported _STAGE_MODULES. Its memory is returned whole when it exits. The fork server starts with this
    process's environment at the first call and serves every later one. A process that ends without an answer
    (killed for memory, crashed) raises RuntimeError naming how it ended."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_STAGE_MODULES)  # read when the server starts; no effect once it runs
    before = current_rss_bytes() or 0
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, os.getpid(), function, *args), name=function.__name__,
                              daemon=True)  # ended, not waited for, if this process exits first (Ctrl-C)
    process.start()
    send.close()  # the child's copy is then the only one: EOF here once it exits
    try:
        failed, value, child_peak = receive.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"the process running {function.__name__} ended without an answer: "
                           f"{_how_it_ended(process.exitcode)}") from None
    finally:
        receive.close()
    process.join()
    if failed:
        exception, remote_traceback = value
        raise exception from RuntimeError(f"in the process running {function.__name__}:\n{remote_traceback}")
    _overlapping_peaks.append(before + (child_peak or 0))
    return value


def _how_it_ended(exitcode: int) -> str:
    if exitcode == -signal.SIGKILL:
        return ("killed by SIGKILL, most often the kernel's out-of-memory killer (`dmesg` names it); the export's "
                f"peak so far was {(export_peak_rss_bytes() or 0) / GIB:.1f} GiB")
    if exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return (f"exit code {exitcode}, its error above (a script that calls export_model needs "
            "`if __name__ == \"__main__\":` around the call: the process imports the script first)")


def _child(send, exporter_pid: int, function, *args) -> None:
    """Send (failed, function(*args) or (exception, traceback text), this process's peak RSS), exiting as soon as
    the exporting process does (killed or not): a killed export leaves no process writing into its directory. Its
    parent is the fork server, which outlives the exporter while this process runs (it holds the server's liveness
    pipe), so PR_SET_PDEATHSIG would not do."""
    threading.Thread(target=_exit_after, args=(exporter_pid,), daemon=True).start()
    try:
        answer = (False, function(*args), peak_rss_bytes())
    except Exception as e:  # noqa: BLE001  raised again in the exporting process
        answer = (True, (e, traceback.format_exc()), None)
        try:
            pickle.dumps(e)
        except Exception:  # noqa: BLE001  an exception that does not pickle: its text instead
            answer = (True, (RuntimeError(f"{type(e).__name__}: {e}"), answer[1][1]), None)
    send.send(answer)


def _exit_after(pid: int) -> None:
    try:
        select.select([os.pidfd_open(pid)], [], [])  # readable once the process has exited, reaped or not
    except ProcessLookupError:  # it already has
        pass
    except (OSError, AttributeError):  # no pidfd (Linux before 5.3, not Linux): ask every half second
        while _alive(pid):
            time.sleep(0.5)
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


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
