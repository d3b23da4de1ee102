"""kernels/bench_preprocess.py: the CPU rows and the plainly stated reason for missing GPU rows; the GPU kernel
rows' launch code run through the host stand-in (kernels/host_build.HostDevice)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgevl.kernels import bench_preprocess
from edgevl.kernels.host_build import HostDevice, build_host_library, find_host_compiler


def test_cpu_mode_prints_the_table_and_why_gpu_rows_are_missing(tmp_path, capsys):
    args = ["--repeats", "1", "--warmup", "0", "--cpu-only", "--json", str(tmp_path / "b.json")]
    assert bench_preprocess.main(args) == 0
    out = capsys.readouterr().out
    for workload, tiles in [("1920x1080", 9), ("3840x2160", 9), ("six-cameras", 13)]:
        assert any(line.split()[:3] == [workload, str(tiles), "pillow-cpu"] for line in out.splitlines()), out
    assert "GPU rows missing: torch-gpu: --cpu-only given" in out
    result = json.loads((tmp_path / "b.json").read_text())
    assert {r["device"] for r in result["rows"]} == {"cpu"}
    assert all(r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] for r in result["rows"])
    assert set(result["missing"]) == {"torch-gpu", "edgevl-gpu", "edgevl-gpu-dev"}


def test_gpu_kernel_rows_run_on_the_host_stand_in(tmp_path, monkeypatch):
    if find_host_compiler() is None:
        pytest.skip("no host C++ compiler to build kernels/host_emulation.cpp")
    device = HostDevice(build_host_library(tmp_path))
    monkeypatch.setattr(bench_preprocess, "_cuda_kernels", lambda: device)
    rng = np.random.default_rng(0)
    small = {"1920x1080": rng.integers(0, 256, (90, 160, 3), dtype=np.uint8),
             "3840x2160": rng.integers(0, 256, (120, 200, 3), dtype=np.uint8),
             "six-cameras": [rng.integers(0, 256, (45, 80, 3), dtype=np.uint8) for _ in range(6)]}
    for on_device in (False, True):
        calls = bench_preprocess.edgevl_gpu(small, fp16=True, frames_on_device=on_device)
        before = device.launches
        for workload in bench_preprocess.WORKLOADS:
            calls[workload]()
        assert device.launches - before == 2 + 2 + 7  # grid + thumbnail twice, six views + the canvas thumbnail


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        bench_preprocess.main(["--repeats", "0"])
