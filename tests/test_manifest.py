"""The typed manifest: what edgevl's exporters wrote reads into the dataclasses, and writing one back gives the same
JSON (tests/test_untrusted_files.py checks hostile manifests)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgevl.manifest import FIXED_KV, Manifest, manifest_from_dict
from edgevl.specs import KNOWN_SPECS

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["manifest-fp32-0.1.0.json", "manifest-int8-0.1.0.json"])
def test_manifests_edgevl_0_1_0_wrote_read_and_write_back_unchanged(name):
    """Manifests of a tiny fp32 and int8 export made by edgevl 0.1.0's dict-building exporter: the same schema, so
    those exports keep loading, and the typed form writes the same JSON back."""
    data = json.loads((DATA / name).read_text())
    manifest = manifest_from_dict(data, DATA / name)
    assert isinstance(manifest, Manifest) and manifest.to_dict() == data


def test_fp32_manifest_reads_typed():
    manifest = manifest_from_dict(json.loads((DATA / "manifest-fp32-0.1.0.json").read_text()))
    assert manifest.kv_cache.decoder_fixed == FIXED_KV and manifest.graphs.decoder_fixed == "decoder_fixed.onnx"
    assert manifest.spec.decoder.head_dim * manifest.spec.decoder.num_heads == manifest.spec.decoder.hidden_size
    assert manifest.paths() == {"graphs.vision": "vision.onnx", "graphs.decoder": "decoder.onnx",
                                "graphs.embed_tokens": "embed_tokens.npy", "graphs.decoder_fixed": "decoder_fixed.onnx"}


def test_every_known_shape_round_trips():
    base = manifest_from_dict(json.loads((DATA / "manifest-fp32-0.1.0.json").read_text()))
    for spec in KNOWN_SPECS.values():
        manifest = Manifest(**{**base.__dict__, "spec": spec})
        assert manifest_from_dict(manifest.to_dict()) == manifest
