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
