"""`edgevl selftest --full`: without a GPU it runs the CPU part, calls every GPU item "not run" and exits non-zero;
with a GPU (faked here) its report says pass / fail per item and the exit status is 0 only when all passed."""
from __future__ import annotations

import contextlib
import functools
import io
import json
from dataclasses import replace

import pytest

import edgevl.gpu_check as gpu_check
from edgevl.cli import main
from edgevl.selftest import Check, Report

ITEM_FIELDS = {"name", "gpu", "status", "reason", "seconds", "details"}
REPORT_FIELDS = {"schema", "edgevl_version", "passed", "gpu_ran", "gpu_problem", "started", "seconds", "doctor",
                 "items"}
GPU_ITEMS = {"gpu tests", "selftest gpu", "gpu benchmarks", "gpu tiling"}


def _full(out) -> tuple[int, list[str], dict]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["selftest", "--full", "--out", str(out)])
    return code, stdout.getvalue().strip().splitlines(), json.loads((out / "report.json").read_text())


def _assert_schema(report: dict) -> None:
    assert set(report) == REPORT_FIELDS and report["schema"] == gpu_check.SCHEMA
    for item in report["items"]:
        assert set(item) == ITEM_FIELDS, item["name"]
        assert item["status"] in gpu_check.STATUSES
        assert isinstance(item["seconds"], float) and item["seconds"] >= 0
        assert isinstance(item["details"], dict)
        assert (item["reason"] == "") == (item["status"] == "pass"), item


@pytest.fixture(scope="module")
def without_gpu(tmp_path_factory, kept_selftest_exports):
    _, problem = gpu_check.probe()
    if problem is None:
        pytest.skip("a GPU is usable here: the no-GPU path is not reachable")
    with pytest.MonkeyPatch.context() as mp:
        # one family, its exports kept from the suite's, and the one GPU test file that skips whole keep this under
        # a minute on 2 cores
        mp.setattr(gpu_check, "selftest", functools.partial(gpu_check.selftest, families=("qwen2",)))
        mp.setattr(gpu_check, "GPU_TEST_FILES", ("tests/test_tensorrt_gpu.py",))
        out = tmp_path_factory.mktemp("gpu-check")
        kept_selftest_exports(out / gpu_check.SELFTEST_WORK, ("qwen2",))
        return (out, problem, *_full(out))


def test_without_gpu_exits_nonzero_and_says_the_gpu_part_did_not_run(without_gpu):
    _, problem, code, lines, report = without_gpu
    assert code != 0 and report["passed"] is False and report["gpu_ran"] is False
    assert lines[-1].startswith("NOT A PASS: the GPU part did not run") and problem in lines[-1]
    assert any(line.startswith("[gpu-check] 1/5 gpu tests") for line in lines)  # progress lines


def test_without_gpu_every_gpu_item_is_not_run_with_doctors_reason(without_gpu):
    _, problem, _, _, report = without_gpu
    _assert_schema(report)
    items = {i["name"]: i for i in report["items"]}
    assert {n for n, i in items.items() if i["gpu"]} == GPU_ITEMS
    assert report["gpu_problem"] == problem and report["doctor"]["gpu_problem"] in problem
    for name in GPU_ITEMS:
        assert items[name]["status"] == "not run" and items[name]["reason"] == problem, name
    # what each GPU item found here stays in its details
    assert items["gpu tests"]["details"]["skipped"] == items["gpu tests"]["details"]["tests"] > 0
    assert {n["what"] for n in items["selftest gpu"]["details"]["not_run"]} >= {"onnxruntime-cuda", "tensorrt"}
    assert all(not row["available"] for row in items["gpu benchmarks"]["details"]["rows"])


def test_without_gpu_the_cpu_part_still_runs_and_passes(without_gpu):
    out, _, _, _, report = without_gpu
    cpu = next(i for i in report["items"] if i["name"] == "selftest cpu")
    assert cpu["gpu"] is False and cpu["status"] == "pass" and cpu["details"]["checks"] > 0
    assert json.loads((out / "selftest.json").read_text())["passed"] is True


def test_without_gpu_report_md_has_every_item(without_gpu):
    out, _, _, lines, report = without_gpu
    md = (out / "report.md").read_text()
    for item in report["items"]:
        assert f"| {item['name']} | {'GPU' if item['gpu'] else 'CPU'} | {item['status']} |" in md
    assert lines[-1] in md


# --- the GPU path against fakes ---------------------------------------------------------------------------------

FAKE_GPU = {"gpu": {"name": "Fake GPU", "compute_capability": "9.0"}, "gpu_problem": None, "python": "3",
            "machine": "Linux x86_64", "cuda_driver": "13.0", "tensorrt": "10.16", "onnxruntime": "1.31"}


def _tests_result(failed: int = 0) -> dict:
    skips = [{"test": "tests.test_kernels_gpu::test_no_driver_error_is_actionable",
              "reason": "a CUDA device is present; the no-driver message is not reachable"}]
    failures = [{"test": "tests.test_tensorrt_gpu::test_fp16", "message": "cosine 0.2 < 0.999"}] * failed
    return {"exit_code": 1 if failed else 0, "log": "gpu-tests.log", "junit": "gpu-tests.xml", "tests": 10,
            "passed": 9 - failed, "failed": failed, "errors": 0, "skipped": 1, "skips": skips, "failures": failures}


def _selftest_result(trt_passes: bool = True) -> Report:
    checks = [Check("vision", "qwen2", "onnxruntime-cpu fp32", "image-embedding cosine", 1.0, ">= 0.99999", True),
              Check("vision", "qwen2", "onnxruntime-cuda fp32", "image-embedding cosine", 1.0, ">= 0.99999", True),
              Check("vision", "qwen2", "tensorrt fp16 vs pytorch fp32", "image embeds cosine min",
                    0.999 if trt_passes else 0.5, ">= 0.99", trt_passes),
              Check("tile_assembly", "-", "kernels vs cpu", "64x64 RGB max uint8 steps", 0.0, "<= 1.0", True)]
    return Report(checks=checks)


def _bench_result(available: bool = True) -> dict:
    row = {"backend": "trt-fp16", "available": available, "reason": None if available else "no plans",
           "ttft_ms": 5.0 if available else None, "decode_tokens_per_s": 200.0 if available else None}
    return {"requested": ["trt-fp16"], "exit_code": 0, "rows": [row], "log": "benchmarks.log"}


def _tiling_result(gpu_rows: bool = True) -> dict:
    missing = {} if gpu_rows else {"edgevl-gpu": "no CUDA device"}
    return {"exit_code": 0, "rows": [{"workload": "1920x1080", "method": "edgevl-gpu", "median_ms": 1.2}],
            "missing": missing}


def _fake_items(calls: list, **results) -> tuple:
    fakes = {gpu_check.run_gpu_tests: results.get("tests", _tests_result()),
             gpu_check.run_selftest: results.get("selftest", _selftest_result()),
             gpu_check.run_gpu_benchmarks: results.get("bench", _bench_result()),
             gpu_check.run_tiling_benchmark: results.get("tiling", _tiling_result())}
    runs = {real: (lambda out, log, r=r, name=real.__name__: calls.append(name) or r) for real, r in fakes.items()}
    return tuple(replace(item, run=runs[item.run]) for item in gpu_check.ITEMS)


@pytest.mark.parametrize("case, results, expected", [
    ("all pass", {}, {}),
    ("a TensorRT check fails", {"selftest": _selftest_result(trt_passes=False)}, {"selftest gpu": "fail"}),
    ("a GPU test fails", {"tests": _tests_result(failed=1)}, {"gpu tests": "fail"}),
    ("a GPU benchmark row is missing", {"bench": _bench_result(available=False)}, {"gpu benchmarks": "not run"}),
    ("the GPU tiling rows are missing", {"tiling": _tiling_result(gpu_rows=False)}, {"gpu tiling": "not run"}),
])
def test_gpu_path_against_fakes(monkeypatch, tmp_path, case, results, expected):
    calls = []
    monkeypatch.setattr(gpu_check, "probe", lambda: (FAKE_GPU, None))
    monkeypatch.setattr(gpu_check, "ITEMS", _fake_items(calls, **results))
    code, lines, report = _full(tmp_path)
    _assert_schema(report)
    assert sorted(calls) == ["run_gpu_benchmarks", "run_gpu_tests", "run_selftest",
                             "run_tiling_benchmark"]  # one selftest, two items
    statuses = {i["name"]: i["status"] for i in report["items"]}
    assert statuses == {name: expected.get(name, "pass") for name in statuses}, case
    md = (tmp_path / "report.md").read_text()
    assert "GPU Fake GPU" in md
    for name, status in statuses.items():
        assert f"| {name} | " in md and ("| **FAIL** |" if status == "fail" else f"| {status} |") in md
    if expected:
        assert code == 1 and report["passed"] is False and lines[-1].startswith(("FAIL", "NOT A PASS"))
        failed = next(i for i in report["items"] if i["status"] != "pass")
        assert failed["reason"] and failed["reason"] in md
    else:
        assert code == 0 and report["passed"] is True and report["gpu_ran"] is True
        assert lines[-1] == "PASS: every item passed on Fake GPU"


def test_a_failing_check_names_itself(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "probe", lambda: (FAKE_GPU, None))
    monkeypatch.setattr(gpu_check, "ITEMS", _fake_items([], selftest=_selftest_result(trt_passes=False)))
    _, lines, report = _full(tmp_path)
    reason = next(i["reason"] for i in report["items"] if i["name"] == "selftest gpu")
    assert "tensorrt fp16 vs pytorch fp32 (qwen2) image embeds cosine min = 0.5, needs >= 0.99" in reason
    assert lines[-1] == "FAIL: selftest gpu"


def test_an_item_that_raises_fails_and_the_rest_still_run(monkeypatch, tmp_path):
    def broken(out, log):
        raise RuntimeError("cudaErrorIllegalAddress")

    monkeypatch.setattr(gpu_check, "probe", lambda: (FAKE_GPU, None))
    items = _fake_items([])
    monkeypatch.setattr(gpu_check, "ITEMS", (replace(items[0], run=broken), *items[1:]))
    code, _, report = _full(tmp_path)
    assert code == 1
    assert [i["status"] for i in report["items"]] == ["fail", "pass", "pass", "pass", "pass"]
    assert report["items"][0]["reason"] == "RuntimeError: cudaErrorIllegalAddress"


def test_full_needs_out_and_refuses_selftest_only_options(capsys):
    assert main(["selftest", "--full"]) == 2
    assert "--full needs --out DIR" in capsys.readouterr().err
    assert main(["selftest", "--full", "--out", "x", "--backends", "tensorrt"]) == 2
    assert "drop --backends" in capsys.readouterr().err
    assert main(["selftest", "--out", "x"]) == 2
    assert "--out DIR goes with --full" in capsys.readouterr().err
