"""`edgevl selftest` passes on this machine, writes its documented JSON, and fails when a graph is wrong."""
from __future__ import annotations

import json
import shutil

import onnx
import pytest
from onnx import numpy_helper

from edgevl import __version__
from edgevl.cli import main
from edgevl.manifest import manifest_from_dict, write_manifest
from edgevl.selftest import BACKENDS, FAMILIES, selftest

CHECK_FIELDS = {"component", "family", "backend", "check", "value", "threshold", "passed", "seconds"}


@pytest.fixture(scope="module")
def result(tmp_path_factory, kept_selftest_exports):
    out = tmp_path_factory.mktemp("selftest")
    kept = kept_selftest_exports(out / "work", FAMILIES)
    code = main(["selftest", "--json", str(out / "selftest.json"), "--keep", str(out / "work")])
    return code, json.loads((out / "selftest.json").read_text()), out / "work", kept


def test_kept_exports_are_checked_not_made_again(result):
    _, report, work, kept = result
    assert all((export / "manifest.json").stat().st_mtime_ns == mtime for export, mtime in kept.items())
    assert (work / "qwen2" / "checkpoint" / "config.json").is_file()  # the reference still ran from its checkpoint
    assert {c["family"] for c in report["checks"] if c["backend"] == "onnxruntime-cpu int8 vs fp32"} == set(FAMILIES)


def test_a_kept_export_another_edgevl_made_is_made_again(kept_selftest_exports, tmp_path):
    """The fp32 export (from the checkpoint, through export_model) and the int4 one (quantized from it): the paths a
    first `edgevl selftest` takes."""
    work = tmp_path / "work"
    kept = kept_selftest_exports(work, ("qwen2",))
    older = [work / "qwen2" / f"export-{precision}" / "manifest.json" for precision in ("fp32", "int4")]
    for manifest in older:
        manifest.write_text(manifest.read_text().replace('"edgevl_version": "', '"edgevl_version": "0.0.0-older-'))
    assert main(["selftest", "--backends", "onnxruntime-cpu", "--families", "qwen2", "--keep", str(work)]) == 0
    assert all(json.loads(manifest.read_text())["edgevl_version"] == __version__ for manifest in older)
    int8 = work / "qwen2" / "export-int8"
    assert (int8 / "manifest.json").stat().st_mtime_ns == kept[int8]  # this edgevl's: kept


def test_passes_and_exits_zero(result):
    code, report, _, _ = result
    assert code == 0 and report["passed"] is True
    assert report["checks"] and all(c["passed"] for c in report["checks"])


def test_json_is_the_documented_schema(result):
    _, report, _, _ = result
    assert set(report) == {"format_version", "edgevl_version", "passed", "seconds", "cpu", "checks", "not_run"}
    assert report["cpu"]["integer_gemm"]["exact"] is True and report["cpu"]["integer_gemm"]["description"]
    assert report["format_version"] == 1
    for check in report["checks"]:
        assert set(check) == CHECK_FIELDS
        assert check["threshold"].split()[0] in (">=", "<=", "==")
    for entry in report["not_run"]:
        assert set(entry) == {"what", "why"} and entry["why"]


def test_every_family_and_backend_is_checked_or_explained(result):
    _, report, _, _ = result
    for family in FAMILIES:
        assert {c["backend"] for c in report["checks"] if c["family"] == family} >= {
            "pytorch vs transformers", "onnxruntime-cpu fp32", "onnxruntime-cpu int8 vs fp32",
            "onnxruntime-cpu int4 vs fp32"}
    not_run = {n["what"] for n in report["not_run"]}
    for backend in BACKENDS:
        assert backend in not_run or any(c["backend"].startswith(backend) for c in report["checks"]), backend


def test_without_pytorch_the_kept_exports_are_checked_against_each_other(result, tmp_path, monkeypatch):
    """A device without PyTorch (a Jetson, an emulated ARM64 Python) checks int8/int4 exports made elsewhere."""
    import edgevl.selftest as st

    work = tmp_path / "work"
    shutil.copytree(result[2], work, ignore=shutil.ignore_patterns("checkpoint*"))
    real = st._unavailable_reasons
    monkeypatch.setattr(st, "_unavailable_reasons", lambda kept: {**real(kept), "pytorch": "not installed"})
    report = selftest("auto", keep=work, families=FAMILIES, log=lambda _: None)
    assert report.passed
    for family in FAMILIES:
        drift = {c.backend for c in report.checks if c.family == family}
        assert drift == {"onnxruntime-cpu int8 vs fp32", "onnxruntime-cpu int4 vs fp32"}, family
    assert any(n["what"] == "pytorch" for n in report.not_run)
    assert not list(work.glob("*/checkpoint*"))  # nothing was re-made from a checkpoint


def test_a_corrupted_graph_fails_and_names_the_component(kept_selftest_exports, tmp_path):
    kept_selftest_exports(tmp_path / "work", ("qwen2",))
    export = tmp_path / "work" / "qwen2" / "export-fp32"
    model = onnx.load(export / "vision.onnx")
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))  # a projector/fc weight
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
    onnx.save(model, export / "vision.onnx")
    # checksums match again: only the comparison can catch it
    write_manifest(export, manifest_from_dict(json.loads((export / "manifest.json").read_text())))
    assert main(["selftest", "--backends", "onnxruntime-cpu", "--families", "qwen2", "--keep", str(tmp_path / "work"),
                 "--json", str(tmp_path / "selftest.json")]) == 1
    report = json.loads((tmp_path / "selftest.json").read_text())
    assert report["passed"] is False
    assert any(c["component"] == "vision" and c["backend"] == "onnxruntime-cpu fp32"
               for c in report["checks"] if not c["passed"])
