"""The baselines' common source: an InternVL decoder of any family written as the Qwen2 checkpoint llama.cpp's and
onnxruntime-genai's converters read (benchmarks/baselines.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgevl import EdgeVL
from benchmarks.baselines import write_qwen2_dir


@pytest.mark.parametrize("family, fmt", [("qwen2", "original"), ("internlm2", "original"), ("internlm2", "hf")])
def test_every_family_becomes_the_same_qwen2_model(tiny_checkpoint, tmp_path, family, fmt):
    """Same logits from transformers' Qwen2ForCausalLM on the written checkpoint as from edgevl's PyTorch decoder
    (InternLM2's packed wqkv unpacked, zero q/k/v biases where the family has none)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    source = tiny_checkpoint(family, fmt)
    written = write_qwen2_dir(source, tmp_path)
    theirs = transformers.Qwen2ForCausalLM.from_pretrained(written, dtype=torch.float32).eval()
    ours = EdgeVL.from_pretrained(source).backend
    ids = np.arange(5, 40)
    want = ours.prefill(ours.embed_tokens(ids))
    with torch.no_grad():
        got = theirs(torch.from_numpy(ids)[None]).logits[0, -1].numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_phi3_keeps_its_shapes(tiny_checkpoint, tmp_path):
    """Phi-3 maps onto the same tensors (fused qkv and gate/up split); its LongRoPE becomes plain RoPE, so only the
    shapes are compared: a speed baseline needs the same work per token, not the same numbers."""
    safetensors = pytest.importorskip("safetensors")
    import json

    written = write_qwen2_dir(tiny_checkpoint("phi3"), tmp_path)
    config = json.loads((written / "config.json").read_text())
    index = json.loads((written / "model.safetensors.index.json").read_text())["weight_map"]
    with safetensors.safe_open(written / index["model.layers.0.self_attn.k_proj.weight"], "np") as f:
        k = f.get_tensor("model.layers.0.self_attn.k_proj.weight")
        bias = f.get_tensor("model.layers.0.self_attn.q_proj.bias")
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert k.shape == (config["num_key_value_heads"] * head_dim, config["hidden_size"])
    assert not bias.any()


def test_a_float16_source_holds_the_same_weights_rounded(tiny_checkpoint, tmp_path):
    safetensors = pytest.importorskip("safetensors")
    import json

    from edgevl.checkpoint import load_checkpoint

    source = tiny_checkpoint("internlm2")
    written = write_qwen2_dir(source, tmp_path, "float16")
    assert json.loads((written / "config.json").read_text())["torch_dtype"] == "float16"
    assert written != write_qwen2_dir(source, tmp_path)  # each dtype its own cached copy
    index = json.loads((written / "model.safetensors.index.json").read_text())["weight_map"]
    with safetensors.safe_open(written / index["model.layers.1.self_attn.o_proj.weight"], "np") as f:
        o = f.get_tensor("model.layers.1.self_attn.o_proj.weight")
    assert o.dtype == np.float16
    want = np.asarray(load_checkpoint(source).weights["decoder.layers.1.o.weight"], np.float32).astype(np.float16)
    np.testing.assert_array_equal(o, want)


def test_llama_conversions_are_made_only_for_missing_files(tmp_path, monkeypatch):
    """The 4B's Qwen2 checkpoint and F32 GGUF are 15 GB each: neither is made for types whose files exist."""
    import benchmarks.baselines as baselines

    made = []

    def fake_run(cmd, log_path, timed, **kwargs):  # writes the file the command would
        out = cmd[cmd.index("--outfile") + 1] if "--outfile" in cmd else cmd[2]
        made.append(Path(str(out)).name)
        Path(str(out)).write_bytes(b"gguf")

    monkeypatch.setattr(baselines, "run_logged", fake_run)
    model, out = tmp_path / "model", tmp_path / "llama.cpp"
    model.mkdir()
    (model / "config.json").write_text("{}")
    qwen2_writes = []
    qwen2 = lambda: qwen2_writes.append(1) or tmp_path / "qwen2-hf"  # noqa: E731
    files = baselines.llama_convert(tmp_path / "build", model, qwen2, out, ("Q8_0",))
    assert made == ["text-F32.gguf.tmp", "text-Q8_0.gguf.tmp", "mmproj-q8_0.gguf.tmp"] and len(qwen2_writes) == 1
    assert files == {"Q8_0": (out / "text-Q8_0.gguf", out / "mmproj-q8_0.gguf")}
    (out / "text-F32.gguf").unlink()  # what a user short of disk removes once the quantized files exist
    made.clear()
    baselines.llama_convert(tmp_path / "build", model, qwen2, out, ("Q8_0",))
    assert made == [] and len(qwen2_writes) == 1
    baselines.llama_convert(tmp_path / "build", model, qwen2, out, ("Q8_0", "Q4_0"))
    assert made == ["text-F32.gguf.tmp", "text-Q4_0.gguf.tmp"] and len(qwen2_writes) == 2
    with pytest.raises(SystemExit):
        baselines.main(["--llama-types", "Q5_K"])
