"""`edgevl doctor`: structured report + CLI. On this CPU-only machine it must say plainly why TensorRT is out."""
from __future__ import annotations

import json

from edgevl.cli import main
from edgevl.doctor import diagnose, format_report


def test_report_structure_and_backend_reasons():
    report = diagnose()
    names = [b.name for b in report.backends]
    assert names == ["onnxruntime", "tensorrt", "torch", "gpu-preprocess"]
    ort = report.backends[0]
    assert ort.available and "CPUExecutionProvider" in report.onnxruntime_providers
    trt = report.backends[1]
    if report.gpu is None:
        assert report.gpu_problem
        assert not trt.available
        assert "TensorRT needs an NVIDIA GPU" in trt.reason and report.gpu_problem in trt.reason
    else:
        assert report.gpu["compute_capability"].count(".") == 1
        assert trt.available == (report.tensorrt is not None and report.cuda_python is not None)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["backends"][1]["name"] == "tensorrt"


def test_cli_prints_each_library_and_backend(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for label in ("gpu", "cuda driver", "cuda-python", "nvrtc", "tensorrt", "onnxruntime", "backends:"):
        assert label in out
    report = diagnose()
    assert format_report(report).splitlines()[0] == out.splitlines()[0]
    if report.gpu is None:
        assert "tensorrt        NO   TensorRT needs an NVIDIA GPU" in out


def test_cli_json(capsys):
    assert main(["doctor", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"gpu", "tensorrt", "onnxruntime_providers", "backends", "nvrtc"} <= set(data)


def test_huge_page_malloc_is_added_to_glibc_tunables_and_what_the_user_set_wins():
    from edgevl.doctor import HUGE_PAGE_MALLOC, huge_page_malloc_active, with_huge_page_malloc

    env = with_huge_page_malloc({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.cpu.x86_ibt=on"})
    tunables = dict(item.split("=") for item in env["GLIBC_TUNABLES"].split(":"))
    assert env["PATH"] == "/bin"
    assert tunables["glibc.malloc.hugetlb"] == "0" and tunables["glibc.cpu.x86_ibt"] == "on"
    assert tunables["glibc.malloc.trim_threshold"] == HUGE_PAGE_MALLOC["glibc.malloc.trim_threshold"]
    assert not huge_page_malloc_active(env)  # the user turned huge pages off
    assert huge_page_malloc_active(with_huge_page_malloc({}))
    assert not huge_page_malloc_active({})


def test_doctor_tells_a_linux_user_without_it_how_to_start_python(monkeypatch):
    import platform
    import sys

    from edgevl import doctor

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    report = doctor.diagnose()
    assert any("GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in n for n in report.notes)
    monkeypatch.setenv("GLIBC_TUNABLES", doctor.with_huge_page_malloc({})["GLIBC_TUNABLES"])
    assert not any("GLIBC_TUNABLES" in n for n in doctor.diagnose().notes)
