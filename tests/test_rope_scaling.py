"""RoPE scaling on the CPU export path. Phi-3's LongRoPE inside GroupQueryAttention (export/cpu_graph.py): the
fused graph against the PyTorch reference and transformers across the switch at original_max_position_embeddings,
and the int8/int4 exports that run it over the shared KV buffer. InternLM2's dynamic NTK, which never applies
because max_seq never passes max_position_embeddings."""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace

import numpy as np
import onnx
import pytest

from edgevl import EdgeVL
from edgevl.errors import SettingError
from edgevl.export import export_model
from edgevl.export.cpu_graph import fuse_attention
from edgevl.manifest import SHARED_KV, read_manifest, write_manifest
from edgevl.precisions import EXPORT_PRECISIONS

# The tiny Phi-3's original_max_position_embeddings: prompts and decodes here cross it. Against its
# max_position_embeddings of 10240 the attention factor is sqrt(1 + ln(10240 / 48) / ln 48) = 1.54, so the graphs'
# tables must apply it too.
SWITCH = 48
LOGITS_ATOL = 1e-4  # fp32 ONNX Runtime against fp32 PyTorch, logits O(10): measured max differences ~1e-5


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return EdgeVL.from_pretrained(tiny_checkpoint("phi3", original_max_position_embeddings=SWITCH))


@pytest.fixture(scope="module")
def fused(exported, tmp_path_factory):
    """The tiny Phi-3's fp32 export with its attention fused and nothing else (fp32 weights, no RMSNorm fusion, no
    quantization), run by the ONNX Runtime backend over the shared KV layout."""
    out = tmp_path_factory.mktemp("phi3-fused-fp32") / "export"
    shutil.copytree(exported("phi3", original_max_position_embeddings=SWITCH), out)
    manifest = read_manifest(out, verify_checksums=False)
    model = onnx.load(out / "decoder.onnx")
    assert fuse_attention(model, asdict(manifest.spec.decoder), manifest.limits.max_seq) == 2
    onnx.save(model, out / "decoder.onnx")
    write_manifest(out, replace(manifest, kv_cache=SHARED_KV))
    return EdgeVL.from_pretrained(out)


def _prompt(model: EdgeVL, length: int) -> np.ndarray:
    ids = np.array(model.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 20))[:length]
    assert len(ids) == length
    return ids


@pytest.mark.parametrize("prompt, steps, chunk", [(40, 16, None), (40, 16, 16), (60, 8, None), (60, 8, 16)],
                         ids=["short-prompt-decode-crosses", "short-prompt-in-chunks-decode-crosses",
                              "long-prompt", "long-prompt-chunking-asked"])
def test_fused_graph_follows_torch_across_the_switch(reference, fused, prompt, steps, chunk):
    """Logits of the prefill and of every decode step, and the greedy tokens, against edgevl's PyTorch model.
    A prompt past the switch is prefilled in one run even when chunks are asked for: the reference's one call
    rotates all of it with the long factors."""
    assert prompt + steps - 1 > SWITCH  # the last decode step's position: past the switch
    ids = _prompt(reference, prompt)
    embeds = reference.backend.embed_tokens(ids)
    fused.backend.prefill_chunk = chunk
    logits = [(reference.backend.prefill(embeds), fused.backend.prefill(embeds))]
    for _ in range(steps):
        token = int(np.argmax(logits[-1][0]))
        logits.append((reference.backend.decode(token), fused.backend.decode(token)))
    for position, (want, got) in enumerate(logits, start=prompt - 1):
        np.testing.assert_allclose(got, want, atol=LOGITS_ATOL, rtol=0, err_msg=f"logits at position {position}")
        assert np.argmax(got) == np.argmax(want), f"greedy token at position {position}"


@pytest.mark.parametrize("prompt, new_tokens", [(30, 40), (60, 8)], ids=["short-prompt-answer-crosses", "long-prompt"])
def test_fused_graph_generates_what_transformers_generates(tiny_checkpoint, fused, prompt, new_tokens):
    """transformers' InternVLForConditionalGeneration (its Phi-3 LongRoPE) on the same weights: prefill logits and
    greedy tokens."""
    transformers = pytest.importorskip("transformers")
    import torch

    hf = transformers.InternVLForConditionalGeneration.from_pretrained(
        tiny_checkpoint("phi3", "hf", original_max_position_embeddings=SWITCH)).eval()
    ids = _prompt(fused, prompt)
    with torch.no_grad():
        logits = hf(input_ids=torch.from_numpy(ids)[None]).logits[0, -1].numpy()
        out = hf.generate(input_ids=torch.from_numpy(ids)[None], max_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    fused.backend.prefill_chunk = None
    got = fused.backend.prefill(fused.backend.embed_tokens(ids))
    np.testing.assert_allclose(got, logits, atol=LOGITS_ATOL, rtol=0)
    tokens = [int(np.argmax(got))]
    while len(tokens) < new_tokens:
        tokens.append(int(np.argmax(fused.backend.decode(tokens[-1]))))
    assert len(out) == new_tokens and tokens == out


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_exports_fuse_longrope_attention_over_the_shared_cache(exported, precision):
    out = exported("phi3", precision, original_max_position_embeddings=SWITCH)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kv_cache"]["layout"] == "shared"
    for metric, floor in EXPORT_PRECISIONS[precision].drift_bounds.items():
        assert manifest["drift_vs_fp32"][metric] >= floor, metric
    graph = onnx.load(out / "decoder.onnx").graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and not any(n.op_type in ("Softmax", "Concat", "Cos", "Sin") for n in graph.node)
    # One choice of tables per run, read by every layer.
    where = {n.output[0]: n for n in graph.node if n.op_type == "Where"}
    assert sorted(where) == ["gqa.cos", "gqa.sin"] and all(list(n.input[7:9]) == ["gqa.cos", "gqa.sin"] for n in gqa)


def test_internlm2_dynamic_ntk_never_applies(tiny_checkpoint, tmp_path):
    """Dynamic NTK rescales RoPE only for sequences longer than max_position_embeddings (InternLM2's
    modeling_internlm2 and transformers' dynamic_frequency_update alike), so edgevl runs plain RoPE and every path
    refuses a max_seq past it."""
    from edgevl.checkpoint import load_checkpoint

    path = tiny_checkpoint("internlm2")
    checkpoint = load_checkpoint(path)
    assert checkpoint.config["llm_config"]["rope_scaling"]["type"] == "dynamic"
    assert checkpoint.spec.decoder.long_rope is None
    limit = checkpoint.config["llm_config"]["max_position_embeddings"]
    with pytest.raises(SettingError, match=rf"max_seq.*{limit + 1}.*1\.\.{limit}"):
        export_model(path, tmp_path / "out", max_seq=limit + 1, log=lambda _: None)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SettingError, match=rf"max_seq.*{limit + 1}.*{limit}"):
        EdgeVL.from_pretrained(path, max_seq=limit + 1)
