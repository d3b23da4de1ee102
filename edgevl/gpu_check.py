"""`edgevl selftest --full --out DIR`: the whole GPU check as one command, for a GPU machine lent for minutes.

Items run in turn; each is judged "pass", "fail" or "not run":
  gpu tests       tests/test_kernels_gpu.py, test_gpu_preprocess.py, test_tensorrt_gpu.py in a pytest subprocess
                  (counts read from its JUnit XML, not from its text)
  selftest cpu    edgevl.selftest over every backend: its PyTorch and ONNX Runtime CPU checks
  selftest gpu    the same run's ONNX Runtime CUDA, TensorRT and CUDA kernel checks
  gpu benchmarks  `python -m benchmarks run --quick` over the benchmark rows that run on a GPU
  gpu tiling      kernels/bench_preprocess.py: the CUDA tiling kernels against Pillow / OpenCV on CPU, 1080p to 4K
The GPU items run even where there is no GPU (their tests skip, their rows say why), so that a failure in what
does run still shows; there they are "not run" with `edgevl doctor`'s reason unless something failed. Exit
status 0 only when every item passed: a machine without a GPU never passes this check.

DIR/report.json (stable; "schema" changes on any incompatible change):
  {"schema": "edgevl-gpu-check/1", "edgevl_version": str, "passed": bool,
   "gpu_ran": bool (no GPU item was "not run"), "gpu_problem": str or null (why no GPU is usable here),
   "started": ISO 8601 time, "seconds": float, "doctor": edgevl.doctor.DoctorReport.to_dict(),
   "items": [{"name": str, "gpu": bool, "status": "pass" | "fail" | "not run", "reason": str,
              "seconds": float, "details": {...}}]}
`reason` is "" only for "pass". `details` depends on the item: test counts and skip reasons, check names,
benchmark rows, log paths. DIR/report.md is the same as a table; the logs, selftest.json and the benchmark
results sit next to it.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from xml.etree import ElementTree

from . import __version__
from .doctor import diagnose
from .selftest import format_report, selftest, write_json

SCHEMA = "edgevl-gpu-check/1"
STATUSES = ("pass", "fail", "not run")
REPO_ROOT = Path(__file__).resolve().parent.parent
GPU_TEST_FILES = ("tests/test_kernels_gpu.py", "tests/test_gpu_preprocess.py", "tests/test_tensorrt_gpu.py")
# Skips that only happen because a GPU is present (the no-GPU error message cannot be reached): not a gap.
SKIPPED_BECAUSE_GPU = ("a CUDA device is present",)
GPU_SELFTEST_BACKENDS = ("onnxruntime-cuda", "tensorrt", "kernels")  # prefixes of Check.backend / not_run "what"
TESTS_TIMEOUT_S = 1800  # TensorRT builds of the tiny models dominate; a hung driver call must not eat the loan
BENCHMARKS_TIMEOUT_S = 1200
SELFTEST_WORK = "selftest-work"  # under --out: the selftest's --keep DIR, so a second run reuses its exports


@dataclass(frozen=True)
class Item:
    name: str
    gpu: bool  # part of the GPU part: "not run" where no GPU is usable
    run: Callable  # (out_dir, log) -> raw result; items with the same run share one call
    judge: Callable  # raw result -> (status, reason, details)


def probe() -> tuple[dict, str | None]:
    """edgevl doctor's report, and why the GPU part cannot run here (None: a GPU is usable)."""
    report = diagnose()
    problem = None if report.gpu else f"no usable NVIDIA GPU (edgevl doctor: {report.gpu_problem})"
    return report.to_dict(), problem


def _need_checkout(*paths: str) -> None:
    missing = [p for p in paths if not (REPO_ROOT / p).exists()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} not found under {REPO_ROOT}: the full check runs from a "
                                "source checkout installed with pip install -e '.[dev,gpu]' (see DEVICE.md)")


def _run_logged(argv: list[str], log_path: Path, timeout_s: float, log) -> int | None:
    """argv from the repository root, its output into log_path and through log; None when it ran past timeout_s."""
    timed_out = threading.Event()
    with open(log_path, "w") as f, subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                                    stderr=subprocess.STDOUT, text=True) as proc:
        def kill():
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            for line in proc.stdout:
                f.write(line)
                log("    " + line.rstrip())
            code = proc.wait()
        finally:
            timer.cancel()
    return None if timed_out.is_set() else code


def run_gpu_tests(out: Path, log) -> dict:
    _need_checkout(*GPU_TEST_FILES)
    junit, log_path = out / "gpu-tests.xml", out / "gpu-tests.log"
    junit.unlink(missing_ok=True)
    # -n 0: one process, the GPU's memory to itself
    code = _run_logged([sys.executable, "-m", "pytest", "-q", "-rs", "-n", "0", "-p", "no:cacheprovider",
                        f"--junitxml={junit}", *GPU_TEST_FILES], log_path, TESTS_TIMEOUT_S, log)
    counts = _read_junit(junit) if junit.is_file() else {}
    return {"exit_code": code, "files": list(GPU_TEST_FILES), "log": str(log_path), "junit": str(junit), **counts}


def _read_junit(path: Path) -> dict:
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "skips": [], "failures": []}
    for case in ElementTree.parse(path).iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        counts["tests"] += 1
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            counts["skips"].append({"test": test, "reason": outcome.get("message", "")})
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            counts["failures"].append({"test": test, "message": (outcome.get("message") or "")[:500]})
    return counts


def judge_gpu_tests(r: dict) -> tuple[str, str, dict]:
    if r["exit_code"] is None:
        return "fail", f"pytest ran past {TESTS_TIMEOUT_S} s and was stopped; log {r['log']}", r
    if "tests" not in r:
        return "fail", f"pytest exited {r['exit_code']} without writing {r['junit']}; log {r['log']}", r
    if r["failed"] or r["errors"]:
        first = r["failures"][0]
        return "fail", (f"{r['failed']} failed, {r['errors']} errors of {r['tests']}: first {first['test']}: "
                        f"{first['message']}"), r
    if r["exit_code"] != 0 or not r["tests"]:
        return "fail", f"pytest exited {r['exit_code']} with {r['tests']} tests; log {r['log']}", r
    gaps = [s["reason"] for s in r["skips"] if not any(m in s["reason"] for m in SKIPPED_BECAUSE_GPU)]
    if gaps:
        reason, count = Counter(gaps).most_common(1)[0]
        return "not run", f"{len(gaps)} of {r['tests']} tests skipped ({count}: {reason})", r
    return "pass", "", r


def run_selftest(out: Path, log):
    report = selftest("auto", keep=out / SELFTEST_WORK, log=log)
    write_json(report, out / "selftest.json")
    (out / "selftest.txt").write_text(format_report(report) + "\n")
    return report


def _on_gpu(label: str) -> bool:
    return label.startswith(GPU_SELFTEST_BACKENDS)


def _judge_selftest(report, gpu: bool) -> tuple[str, str, dict]:
    checks = [c for c in report.checks if _on_gpu(c.backend) == gpu]
    not_run = [n for n in report.not_run if _on_gpu(n["what"]) == gpu]
    failed = [c for c in checks if not c.passed]
    details = {"checks": len(checks), "failed": [f"{c.backend} {c.family}: {c.check}" for c in failed],
               "not_run": not_run}
    if failed:
        c = failed[0]
        return "fail", (f"{len(failed)} of {len(checks)} checks failed, first {c.backend} ({c.family}) {c.check} "
                        f"= {c.value:.6g}, needs {c.threshold}"), details
    if not checks or (gpu and not_run):
        return "not run", "; ".join(f"{n['what']}: {n['why']}" for n in not_run) or "no check ran", details
    return "pass", "", details


def judge_selftest_cpu(report) -> tuple[str, str, dict]:
    return _judge_selftest(report, gpu=False)


def judge_selftest_gpu(report) -> tuple[str, str, dict]:
    return _judge_selftest(report, gpu=True)


def gpu_benchmark_rows() -> list[str]:
    """The benchmark rows that run on a GPU, read from benchmarks/models.py (not installed with edgevl)."""
    _need_checkout("benchmarks/models.py")
    spec = importlib.util.spec_from_file_location("_edgevl_benchmark_models", REPO_ROOT / "benchmarks" / "models.py")
    models = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = models  # its dataclasses look their module up there
    spec.loader.exec_module(models)
    return [name for name, (_, _, device) in models.BACKENDS.items() if device == "cuda"]


def run_gpu_benchmarks(out: Path, log) -> dict:
    rows = gpu_benchmark_rows()
    if not rows:
        return {"requested": [], "exit_code": 0, "rows": []}
    bench_out, log_path = out / "benchmarks", out / "benchmarks.log"
    code = _run_logged([sys.executable, "-m", "benchmarks", "run", "--quick", "--backends", ",".join(rows),
                        "--out", str(bench_out), "--cache", str(out / "benchmarks-cache"), "--no-plots"],
                       log_path, BENCHMARKS_TIMEOUT_S, log)
    results = sorted(bench_out.glob("*.json"), key=lambda p: p.stat().st_mtime)
    found = json.loads(results[-1].read_text())["rows"] if code == 0 and results else []
    rows_out = [{"backend": r["backend"], "available": r["available"], "reason": r["reason"],
                 "ttft_ms": (r.get("ttft_ms") or {}).get("median"),
                 "decode_tokens_per_s": (r.get("decode_tokens_per_s") or {}).get("median")} for r in found]
    return {"requested": rows, "exit_code": code, "rows": rows_out, "log": str(log_path),
            "json": str(results[-1]) if results else None}


def judge_gpu_benchmarks(r: dict) -> tuple[str, str, dict]:
    if not r["requested"]:
        return "not run", "benchmarks/models.py has no TensorRT or CUDA rows", r
    if r["exit_code"] is None:
        return "fail", f"the benchmarks ran past {BENCHMARKS_TIMEOUT_S} s and were stopped; log {r['log']}", r
    if r["exit_code"] != 0 or not r["rows"]:
        return "fail", f"python -m benchmarks exited {r['exit_code']}; log {r['log']}", r
    crashed = [row for row in r["rows"] if (row["reason"] or "").startswith("worker failed")]
    missing = [row for row in r["rows"] if not row["available"]]
    if crashed or missing:
        return ("fail" if crashed else "not run"), "; ".join(f"{x['backend']}: {x['reason']}"
                                                             for x in crashed or missing), r
    return "pass", "", r


def run_tiling_benchmark(out: Path, log) -> dict:
    from .kernels import bench_preprocess

    path = out / "tiling.json"
    code = bench_preprocess.main(["--repeats", "10", "--json", str(path)])
    return {"exit_code": code, **(json.loads(path.read_text()) if path.is_file() else {})}


def judge_tiling_benchmark(r: dict) -> tuple[str, str, dict]:
    if r["exit_code"] != 0:
        return "fail", f"kernels/bench_preprocess.py exited {r['exit_code']}", r
    missing = {name: why for name, why in (r.get("missing") or {}).items() if name.startswith("edgevl-gpu")}
    if missing:
        return "not run", "; ".join(f"{name}: {why}" for name, why in missing.items()), r
    return "pass", "", r


ITEMS = (
    Item("gpu tests", True, run_gpu_tests, judge_gpu_tests),
    Item("selftest cpu", False, run_selftest, judge_selftest_cpu),
    Item("selftest gpu", True, run_selftest, judge_selftest_gpu),
    Item("gpu benchmarks", True, run_gpu_benchmarks, judge_gpu_benchmarks),
    Item("gpu tiling", True, run_tiling_benchmark, judge_tiling_benchmark),
)


def run_check(out, items=None, log=print) -> dict:
    """Run every item, write DIR/report.json and DIR/report.md, and return the report (schema above)."""
    items = ITEMS if items is None else items
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started, start = datetime.datetime.now().astimezone(), time.perf_counter()
    doctor, gpu_problem = probe()
    log(f"[gpu-check] GPU: {doctor['gpu']['name'] if doctor.get('gpu') else gpu_problem}")
    raw, results = {}, []
    for n, item in enumerate(items, 1):
        log(f"[gpu-check] {n}/{len(items)} {item.name} ...")
        item_start = time.perf_counter()
        results.append(_run_item(item, raw, out, gpu_problem, log))
        results[-1]["seconds"] = round(time.perf_counter() - item_start, 2)
        log(f"[gpu-check] {item.name}: {results[-1]['status']}"
            + (f" ({results[-1]['reason']})" if results[-1]["reason"] else ""))
    report = {"schema": SCHEMA, "edgevl_version": __version__,
              "passed": bool(results) and all(r["status"] == "pass" for r in results),
              "gpu_ran": not any(r["gpu"] and r["status"] == "not run" for r in results),
              "gpu_problem": gpu_problem, "started": started.isoformat(timespec="seconds"),
              "seconds": round(time.perf_counter() - start, 2), "doctor": doctor, "items": results}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(format_markdown(report, out))
    log(f"[gpu-check] wrote {out / 'report.json'} and {out / 'report.md'}")
    return report


def _run_item(item: Item, raw: dict, out: Path, gpu_problem: str | None, log) -> dict:
    if item.run not in raw:
        try:
            raw[item.run] = item.run(out, log)
        except Exception as e:  # this item fails; the others still run
            raw[item.run] = e
    result = raw[item.run]
    if isinstance(result, Exception):
        status, reason = "fail", f"{type(result).__name__}: {result}"
        details = {"traceback": "".join(traceback.format_exception(result))[-4000:]}
    else:
        status, reason, details = item.judge(result)
    if item.gpu and gpu_problem and status != "fail":
        details = {**details, "judged_here": {"status": status, "reason": reason}}
        status, reason = "not run", gpu_problem
    return {"name": item.name, "gpu": item.gpu, "status": status, "reason": reason, "seconds": 0.0,
            "details": details}


def verdict(report: dict) -> str:
    """The last line printed: a fleet script must not mistake a run without a GPU for a pass."""
    if report["passed"]:
        return f"PASS: every item passed on {report['doctor']['gpu']['name']}"
    failed = [r["name"] for r in report["items"] if r["status"] == "fail"]
    parts = [f"FAIL: {', '.join(failed)}"] if failed else []
    if not report["gpu_ran"]:
        why = report["gpu_problem"] or next(r["reason"] for r in report["items"] if r["status"] == "not run")
        parts.append(f"NOT A PASS: the GPU part did not run ({why})")
    elif not failed:
        parts.append("NOT A PASS: " + ", ".join(r["name"] for r in report["items"] if r["status"] != "pass")
                     + " did not run")
    return "; ".join(parts)


def format_markdown(report: dict, out: Path) -> str:
    cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    doctor = report["doctor"]
    gpu = doctor["gpu"]["name"] if doctor.get("gpu") else f"none: {report['gpu_problem']}"
    lines = [f"# edgevl GPU check ({report['started']})", "",
             f"edgevl {report['edgevl_version']}, Python {doctor.get('python')} ({doctor.get('machine')}), "
             f"GPU {gpu}, CUDA driver {doctor.get('cuda_driver')}, TensorRT {doctor.get('tensorrt')}, "
             f"ONNX Runtime {doctor.get('onnxruntime')}, {report['seconds']:.0f} s", "",
             "| item | part | status | s | reason |", "|---|---|---|---:|---|"]
    for r in report["items"]:
        status = "**FAIL**" if r["status"] == "fail" else r["status"]
        lines.append(f"| {r['name']} | {'GPU' if r['gpu'] else 'CPU'} | {status} | {r['seconds']:.0f} | "
                     f"{cell(r['reason'])} |")
    files = sorted(p.name for p in out.iterdir() if p.name not in ("report.json", "report.md"))
    lines += ["", verdict(report), "", f"Also in {out}: {', '.join(files) or 'nothing'}", ""]
    return "\n".join(lines)
