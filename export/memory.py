"""An export's memory and progress: the process's peak RSS for each stage's log line, freed memory handed back to
the OS between stages, and progress with an ETA for the per-tensor and per-tile loops."""
from __future__ import annotations

import ctypes
import gc
import os
import signal
import sys
import time

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


def run_in_subprocess(function, *args):
    """function(*args) in a fresh Python process (spawned: nothing of this one's memory is shared or copied);
    its memory is returned whole when it exits."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    before = current_rss_bytes() or 0
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        result, child_peak = pool.submit(_child, os.getpid(), function, *args).result()
    _overlapping_peaks.append(before + (child_peak or 0))
    return result


def _child(parent_pid: int, function, *args):
    """function(*args) and this process's peak RSS. Dies with its parent (Linux), so that a killed export leaves
    no process writing into its directory."""
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(1)
    return function(*args), peak_rss_bytes()


_PR_SET_PDEATHSIG = 1


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
