"""Shared fixtures: tiny random checkpoints written once per session in the real on-disk formats."""
from __future__ import annotations

import pytest

from edgevl.testing.checkpoints import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(family, fmt="original", **options) -> directory, cached per argument set."""
    made = {}

    def make(family: str, fmt: str = "original", **options):
        key = (family, fmt, tuple(sorted(options.items())))
        if key not in made:
            name = "-".join([family, fmt] + [f"{k}={v}" for k, v in sorted(options.items())])
            made[key] = write_tiny_checkpoint(tmp_path_factory.mktemp(name), family=family, fmt=fmt, **options)
        return made[key]

    return make


@pytest.fixture(scope="session")
def exported(tiny_checkpoint, tmp_path_factory):
    """exported(family, precision="fp32", **options) -> an `edgevl export` directory of
    tiny_checkpoint(family, **options), cached."""
    from edgevl.export import export_model

    made = {}

    def make(family: str, precision: str = "fp32", **options):
        key = (family, precision, tuple(sorted(options.items())))
        if key not in made:
            name = "-".join(["export", family, precision] + [f"{k}={v}" for k, v in sorted(options.items())])
            out = tmp_path_factory.mktemp(name)
            export_model(tiny_checkpoint(family, **options), out, precision=precision, log=lambda _: None)
            made[key] = out
        return made[key]

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
