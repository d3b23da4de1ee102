"""Checkpoint loading: both formats, every family, dtypes, shards, and errors that name file and key."""
from __future__ import annotations

import json
import shutil

import ml_dtypes
import numpy as np
import pytest

from edgevl.checkpoint import load_checkpoint
from edgevl.specs import CheckpointError
from edgevl.testing.checkpoints import random_weights

FAMILIES = ["qwen2", "internlm2", "phi3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_both_formats_give_the_written_weights(tiny_checkpoint, family):
    original = load_checkpoint(tiny_checkpoint(family, "original"))
    hf = load_checkpoint(tiny_checkpoint(family, "hf"))
    expected = random_weights(original.spec, seed=0)
    assert original.format == "original" and hf.format == "hf"
    assert set(original.weights) == set(hf.weights) == set(expected)
    for name, w in expected.items():
        np.testing.assert_array_equal(original.weights[name], w, err_msg=name)
        np.testing.assert_array_equal(hf.weights[name], w, err_msg=name)


def test_spec_from_original_config(tiny_checkpoint):
    ck = load_checkpoint(tiny_checkpoint("phi3"))
    spec = ck.spec
    assert (spec.template, spec.decoder.family, spec.projector.ps_version) == ("phi3-chat", "phi3", "v2")
    assert spec.tiling.max_tiles == 12 and spec.tiling.use_thumbnail
    assert spec.image_tokens_per_tile == 256
    lr = spec.decoder.long_rope
    # LongRoPE attention factor sqrt(1 + ln(max/original) / ln(original)), as in Phi-3 / transformers.
    assert lr.attention_factor == pytest.approx(np.sqrt(1 + np.log(10240 / 320) / np.log(320)))
    assert ck.config["llm_config"]["attn_implementation"] == "flash_attention_2"  # stored, and ignored


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_keep_their_dtype(tiny_checkpoint, dtype):
    ck = load_checkpoint(tiny_checkpoint("qwen2", dtype=dtype))
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    expected = random_weights(ck.spec, seed=0)["decoder.layers.0.qkv.weight"].astype(np_dtype)
    assert ck.dtype == dtype
    np.testing.assert_array_equal(ck.weights["decoder.layers.0.qkv.weight"], expected)


def test_sharded_equals_single_file(tiny_checkpoint):
    single = load_checkpoint(tiny_checkpoint("internlm2"))
    sharded = load_checkpoint(tiny_checkpoint("internlm2", shards=3))
    assert len(list(sharded.path.glob("model-*-of-00003.safetensors"))) == 3
    for name, w in single.weights.items():
        np.testing.assert_array_equal(sharded.weights[name], w, err_msg=name)


def test_hf_legacy_llava_layout_loads(tiny_checkpoint, tmp_path):
    """-hf checkpoints saved before transformers 4.52 use language_model.model.* / vision_tower.* names."""
    from edgevl.checkpoint import read_safetensors
    from edgevl.testing.checkpoints import write_safetensors

    src = tiny_checkpoint("qwen2", "hf")
    shutil.copytree(src, tmp_path / "legacy")
    tensors = read_safetensors(src / "model.safetensors")
    renamed = {}
    for name, w in tensors.items():
        name = name.removeprefix("model.")
        if name.startswith("language_model."):
            name = "language_model.model." + name[len("language_model."):]
        renamed["language_model.lm_head.weight" if name == "lm_head.weight" else name] = np.array(w)
    write_safetensors(tmp_path / "legacy" / "model.safetensors", renamed, "float32")
    legacy = load_checkpoint(tmp_path / "legacy")
    for name, w in load_checkpoint(src).weights.items():
        np.testing.assert_array_equal(legacy.weights[name], w, err_msg=name)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_checkpoint(tmp_path)


def test_missing_shard_names_the_file(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint("qwen2", shards=2), tmp_path / "m")
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: shard listed"):
        load_checkpoint(d)


def test_unknown_architecture(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint("qwen2"), tmp_path / "m")
    _edit_config(d, lambda c: c.update(architectures=["LlavaForConditionalGeneration"], model_type="llava"))
    with pytest.raises(CheckpointError, match=r"config\.json: architectures=\['LlavaForConditionalGeneration'\]"):
        load_checkpoint(d)


def test_unknown_llm(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint("qwen2"), tmp_path / "m")
    _edit_config(d, lambda c: c["llm_config"].update(architectures=["MistralForCausalLM"]))
    with pytest.raises(CheckpointError, match=r"llm_config: architectures=\['MistralForCausalLM'\]"):
        load_checkpoint(d)


def test_shape_mismatch_names_the_weight(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint("qwen2"), tmp_path / "m")
    _edit_config(d, lambda c: c["llm_config"].update(intermediate_size=128))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight \+ .*has shape \[192, 64\].*implies \[256, 64\]"):
        load_checkpoint(d)


def test_missing_and_unexpected_weights(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint("qwen2"), tmp_path / "fewer")
    _edit_config(d, lambda c: c["llm_config"].update(num_hidden_layers=3))
    with pytest.raises(CheckpointError, match=r"missing weight 'language_model\.model\.layers\.2\."):
        load_checkpoint(d)
    d = _copy(tiny_checkpoint("qwen2"), tmp_path / "more")
    _edit_config(d, lambda c: c["llm_config"].update(num_hidden_layers=1))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected weight 'language_model\.model\.layers\.1"):
        load_checkpoint(d)


def test_truncated_weights_file(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint("qwen2"), tmp_path / "m")
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .* past the file's end"):
        load_checkpoint(d)


def test_pytorch_bin_only_is_explained(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint("qwen2"), tmp_path / "m")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"found pytorch_model\.bin: convert"):
        load_checkpoint(d)
