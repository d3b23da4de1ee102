"""Shared fixtures: tiny random checkpoints in the real on-disk formats and their exports, each made once per test
run (pytest-xdist's workers share them) and only read by the tests."""
from __future__ import annotations

import fcntl
import shutil

import pytest

from edgevl.cpu import MATMUL_KERNEL_ENV, int8_matmul_kernels
from edgevl.testing.checkpoints import write_tiny_checkpoint


@pytest.fixture(scope="session")
def made_once(tmp_path_factory, worker_id):
    """made_once(name, make) -> a directory make(path) filled, the same one for every worker of this run: the
    first worker to ask makes it (the others wait on its lock), the rest reuse it. Checkpoints and exports are
    deterministic, so which worker made one does not matter."""
    root = tmp_path_factory.getbasetemp()
    shared = root if worker_id == "master" else root.parent  # the workers' base temps are siblings

    def get(name: str, make):
        path = shared / name
        with open(shared / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (shared / f"{name}.done").exists():
                shutil.rmtree(path, ignore_errors=True)  # a failed attempt's leftovers
                path.mkdir()
                make(path)
                (shared / f"{name}.done").touch()
        return path

    return get


def _name(*parts, options: dict) -> str:
    return "-".join([*parts] + [f"{k}={v}" for k, v in sorted(options.items())])


@pytest.fixture(scope="session")
def tiny_checkpoint(made_once):
    """tiny_checkpoint(family, fmt="original", **options) -> directory, made once per argument set."""
    def make(family: str, fmt: str = "original", **options):
        return made_once(_name("checkpoint", family, fmt, options=options),
                         lambda path: write_tiny_checkpoint(path, family=family, fmt=fmt, **options))

    return make


@pytest.fixture(scope="session")
def exported(tiny_checkpoint, made_once):
    """exported(family, precision="fp32", **options) -> an `edgevl export` directory of
    tiny_checkpoint(family, **options), made once. The other precisions quantize the fp32 one (quantize_export,
    which `edgevl export --precision` runs after an fp32 export of its own): one torch export per checkpoint."""
    from edgevl.export import export_model, quantize_export

    quiet = lambda _: None  # noqa: E731

    def make(family: str, precision: str = "fp32", **options):
        if precision == "fp32":
            write = lambda path: export_model(tiny_checkpoint(family, **options), path, log=quiet)  # noqa: E731
        else:
            write = lambda path: quantize_export(make(family, **options), path, precision, log=quiet)  # noqa: E731
        return made_once(_name("export", family, precision, options=options), write)

    return make


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory):
    """(family, fmt) -> (Tokenizer, {special token: id}) for every tokenizer format of every family."""
    from edgevl.testing.tokenizers import FAMILY_FORMATS, write_tokenizer
    from edgevl.tokenizer import load_tokenizer

    out = {}
    for family, fmts in FAMILY_FORMATS.items():
        for fmt in fmts:
            d = tmp_path_factory.mktemp(f"{family}-{fmt}")
            ids = write_tokenizer(d, family, fmt)
            out[family, fmt] = load_tokenizer(d), ids
    return out


@pytest.fixture(scope="session")
def kept_selftest_exports(exported):
    """kept_selftest_exports(work, families) fills an `edgevl selftest --keep` DIR with the suite's exports of the
    same tiny checkpoints, as an earlier run leaves it (test_selftest.py runs one selftest from nothing), and returns
    {export directory: its manifest's modification time}."""
    from edgevl.selftest import QUANTIZED

    def seed(work, families) -> dict:
        kept = {}
        for family in families:
            for precision in ("fp32", *QUANTIZED):
                export = shutil.copytree(exported(family, precision), work / family / f"export-{precision}")
                kept[export] = (export / "manifest.json").stat().st_mtime_ns
        return kept

    return seed


@pytest.fixture(params=["avx2", "avx512-vnni", "amx"])
def int8_kernel(request, monkeypatch):
    """Each of Int8MatMul's kernels this CPU runs, named through EDGEVL_MATMUL_KERNEL (read when a session is built):
    both compute the same integers, so every bit-for-bit test holds for each."""
    if request.param not in int8_matmul_kernels():
        pytest.skip(f"Int8MatMul's {request.param} kernels need a CPU with it; this one runs {int8_matmul_kernels()}")
    monkeypatch.setenv(MATMUL_KERNEL_ENV, request.param)
    return request.param
