"""What the numbers were measured on: CPU, cores, RAM, library versions, thread settings, what else was running,
and the machine's memory bandwidth (the roofline's numerator)."""
from __future__ import annotations

import os
import platform
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from edgevl import cpu

from . import isa_mask

THREAD_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
              "ORT_NUM_THREADS")


def describe() -> dict:
    lscpu = _lscpu()
    return {"cpu_model": lscpu.get("Model name", platform.processor()), "cpus": os.cpu_count(),
            "cores_per_socket": lscpu.get("Core(s) per socket"), "threads_per_core": lscpu.get("Thread(s) per core"),
            "hypervisor": lscpu.get("Hypervisor vendor"), **cpu.describe(),
            "ram_bytes": _meminfo_bytes("MemTotal"), "ram_available_bytes": _meminfo_bytes("MemAvailable"),
            "os": platform.platform(), "python": platform.python_version(), "versions": versions(),
            "thread_env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
            "isa_mask": os.environ.get(isa_mask.LABEL_ENV)}  # ONNX Runtime shown a smaller CPU


def physical_cores() -> int:
    """Cores, not hardware threads: what ONNX Runtime's intra-op pool defaults to. os.cpu_count() where lscpu cannot
    say."""
    lscpu = _lscpu()
    try:
        return int(lscpu["Core(s) per socket"]) * int(lscpu.get("Socket(s)", "1"))
    except (KeyError, ValueError):
        return os.cpu_count() or 1


def versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("edgevl", "numpy", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "tensorrt"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _lscpu() -> dict:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def _meminfo_bytes(key: str) -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def background_activity(seconds: float = 1.0, own_pids=()) -> dict:
    """Load average and the other processes using CPU over `seconds`: the machine is shared, so say what else ran."""
    load = os.getloadavg()
    busy = []
    try:
        import psutil

        procs = [p for p in psutil.process_iter(["pid", "name", "cmdline"]) if p.pid not in own_pids]
        for p in procs:
            try:
                p.cpu_percent(None)
            except psutil.Error:
                pass
        time.sleep(seconds)
        for p in procs:
            try:
                pct = p.cpu_percent(None)
            except psutil.Error:
                continue
            if pct >= 5.0 and p.pid != os.getpid():
                busy.append({"pid": p.pid, "cpu_percent": round(pct, 1),
                             "command": " ".join(p.info["cmdline"] or [p.info["name"] or "?"])[:120]})
    except ImportError:
        busy = None  # psutil not installed: only the load average
    return {"loadavg_1_5_15": [round(x, 2) for x in load], "busy_processes": busy}


def memory_bandwidth(mib: int = 512, repeat: int = 5, threads: int | None = None) -> dict:
    """Read bandwidth in bytes/s, best of `repeat`, from three short numpy tests on a buffer much larger than the
    caches: a sum (read only), a copy (read + write, counted as 2x the buffer) and a float32 matrix-vector
    product (BLAS, all cores; the access pattern of a decode step). The roofline uses the best read figure."""
    threads = threads or os.cpu_count() or 1
    a = np.ones(mib << 18, dtype=np.float32)  # mib MiB
    b = np.empty_like(a)
    matrix, vector = a.reshape(-1, 4096), np.ones(4096, dtype=np.float32)
    chunks = np.array_split(a, threads)

    def best(fn, nbytes) -> float:
        fn()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return nbytes / min(times)

    with ThreadPoolExecutor(threads) as pool:  # numpy releases the GIL in reductions: one chunk per core
        sum_threads = best(lambda: list(pool.map(np.sum, chunks)), a.nbytes)
    result = {
        "buffer_bytes": a.nbytes,
        "sum_1_thread_bytes_per_s": best(lambda: a.sum(), a.nbytes),
        f"sum_{threads}_threads_bytes_per_s": sum_threads,
        "copy_bytes_per_s": best(lambda: np.copyto(b, a), 2 * a.nbytes),
        "gemv_bytes_per_s": best(lambda: matrix @ vector, a.nbytes),
    }
    result["read_bytes_per_s"] = max(v for k, v in result.items() if k.startswith(("sum_", "gemv")))
    del a, b
    return result

