"""Tiny random InternVL checkpoints in the real on-disk formats, for tests, the demo and `edgevl selftest`.

Weights are drawn (seeded, numpy) in our own layout from `weights.expected_shapes` and written under each
format's names through the inverse of the load map, so the loader and this writer check each other; the -hf
output is also loaded by transformers' own `InternVLForConditionalGeneration` in the parity tests.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import ml_dtypes
import numpy as np

from ..preprocess import TilingConfig
from ..specs import DEFAULT_TEMPLATES, DecoderSpec, LongRope, ModelSpec, ProjectorSpec, VisionSpec
from ..weights import expected_shapes, pack_internlm2_wqkv, unpack_internlm2_wqkv, weight_entries
from ..tokenizer import load_tokenizer
from .tokenizers import write_tokenizer

FAMILIES = ("qwen2", "internlm2", "phi3")
_LLM_ARCH = {"qwen2": "Qwen2ForCausalLM", "internlm2": "InternLM2ForCausalLM", "phi3": "Phi3ForCausalLM"}
_HF_MODEL_TYPE = {"qwen2": "qwen2", "internlm2": "llama", "phi3": "phi3"}  # InternLM2 becomes Llama in -hf
_BOS_EOS = {"qwen2": ("<|endoftext|>", "<|im_end|>"), "internlm2": ("<s>", "</s>"), "phi3": ("<s>", "<|endoftext|>")}
_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def tiny_spec(family: str, vocab_size: int, ps_version: str = "v2", vision_layers: int = 2,
              original_max_position_embeddings: int = 320) -> ModelSpec:
    """The smallest shapes that still exercise every path: GQA, q/k/v bias, Phi-3's LongRoPE switching past
    original_max_position_embeddings (320: 1 tile + prompt stays short, 2 tiles go long), the real 448px / 14px /
    256-token tiling."""
    heads, kv = 4, (4 if family == "phi3" else 2)
    long_rope = None
    if family == "phi3":
        half = 8  # head_dim 16 / 2
        # attention_factor is not written: loaders derive it from max / original.
        long_rope = LongRope(tuple(1.0 + 0.05 * i for i in range(half)), tuple(1.0 + 1.5 * i for i in range(half)),
                             original_max_position_embeddings, attention_factor=0.0)
    decoder = DecoderSpec(
        family=family, hidden_size=64, num_layers=2, num_heads=heads, num_kv_heads=kv, intermediate_size=96,
        vocab_size=vocab_size, rms_norm_eps=1e-6 if family == "qwen2" else 1e-5,
        rope_theta={"qwen2": 1e6, "internlm2": 1e6, "phi3": 1e4}[family], qkv_bias=family == "qwen2",
        max_position_embeddings=10240 if family == "phi3" else 8192, long_rope=long_rope)
    vision = VisionSpec(hidden_size=32, num_layers=vision_layers, num_heads=2, intermediate_size=64)
    projector = ProjectorSpec(vision.hidden_size, decoder.hidden_size, 0.5, ps_version)
    return ModelSpec(vision, projector, decoder, DEFAULT_TEMPLATES[family], TilingConfig())


def random_weights(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Float32 weights scaled so activations stay O(1) and logits have clear margins (greedy parity is then
    a real check, not a coin flip between near-equal logits)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in expected_shapes(spec).items():
        if name.endswith(("norm.weight", "norm1.weight", "norm2.weight")):
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(("ls1", "ls2")):
            w = 0.5 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("bias") or name.endswith(("cls_token", "pos_embed")):
            w = 0.1 * rng.standard_normal(shape)
        elif name == "decoder.embed.weight":
            w = rng.standard_normal(shape)
        else:  # matrices (and the patch conv): unit-variance outputs
            w = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
            if name == "decoder.lm_head.weight":
                w *= 4.0
        weights[name] = w.astype(np.float32)
    return weights


def _split_sizes(ours: str, n: int, spec: ModelSpec) -> list[int]:
    d = spec.decoder
    if ours.startswith("decoder.") and ".qkv." in ours:
        return [d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim, d.num_kv_heads * d.head_dim]
    total = {"qkv": 3 * spec.vision.hidden_size, "gate_up": 2 * d.intermediate_size}[ours.split(".")[-2]]
    return [total // n] * n


def to_checkpoint_names(weights: dict[str, np.ndarray], spec: ModelSpec, fmt: str) -> dict[str, np.ndarray]:
    """Our weights under a format's tensor names (inverse of checkpoint.load_checkpoint)."""
    if fmt == "hf" and spec.decoder.family == "internlm2":  # -hf stores InternLM2 as Llama
        spec = replace(spec, decoder=replace(spec.decoder, family="llama"))
    out = {}
    for entry in weight_entries(spec, fmt):
        w = weights[entry.ours]
        if entry.transform is unpack_internlm2_wqkv:
            w = pack_internlm2_wqkv(w, spec.decoder)
        if len(entry.sources) == 1:
            out[entry.sources[0]] = w
        else:
            parts = np.split(w, np.cumsum(_split_sizes(entry.ours, len(entry.sources), spec))[:-1])
            out.update(zip(entry.sources, parts))
    if fmt == "hf":  # the current transformers layout; the loader also reads the older llava-style one
        out = {("model." + k if not k.startswith("lm_head") else k): v for k, v in out.items()}
    return out


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> None:
    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        blob = np.ascontiguousarray(array.astype(_DTYPES[dtype])).tobytes()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def _write_weights(out: Path, tensors: dict[str, np.ndarray], dtype: str, shards: int) -> None:
    if shards == 1:
        write_safetensors(out / "model.safetensors", tensors, dtype)
        return
    names = list(tensors)
    weight_map = {}
    for i, chunk in enumerate(np.array_split(np.arange(len(names)), shards)):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(out / fname, {names[j]: tensors[names[j]] for j in chunk}, dtype)
        weight_map.update({names[j]: fname for j in chunk})
    total = sum(a.size * np.dtype(_DTYPES[dtype]).itemsize for a in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": int(total)}, "weight_map": weight_map}, indent=2))


def _llm_config_original(d: DecoderSpec, specials: dict[str, int], dtype: str) -> dict:
    cfg = {"architectures": [_LLM_ARCH[d.family]], "model_type": d.family, "hidden_size": d.hidden_size,
           "intermediate_size": d.intermediate_size, "num_attention_heads": d.num_heads,
           "num_hidden_layers": d.num_layers, "num_key_value_heads": d.num_kv_heads, "vocab_size": d.vocab_size,
           "rms_norm_eps": d.rms_norm_eps, "rope_theta": d.rope_theta, "hidden_act": "silu",
           "max_position_embeddings": d.max_position_embeddings, "tie_word_embeddings": False,
           "torch_dtype": dtype, "use_cache": True,
           # Stored by the real checkpoints; must be ignored on CPU.
           "attn_implementation": "flash_attention_2"}
    if d.family == "internlm2":
        cfg.update(bias=d.qkv_bias, rope_scaling={"type": "dynamic", "factor": 2.0},
                   auto_map={"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"})
    if d.long_rope:
        cfg.update(rope_scaling={"type": "su", "short_factor": list(d.long_rope.short_factor),
                                 "long_factor": list(d.long_rope.long_factor)},
                   original_max_position_embeddings=d.long_rope.original_max_position_embeddings)
    bos, eos = _BOS_EOS[d.family]
    return {**cfg, "bos_token_id": specials[bos], "eos_token_id": specials[eos]}


def _config_original(spec: ModelSpec, specials: dict[str, int], dtype: str) -> dict:
    v = spec.vision
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "downsample_ratio": spec.projector.downsample_ratio, "dynamic_image_size": True, "force_image_size": 448,
        "max_dynamic_patch": spec.tiling.max_tiles, "min_dynamic_patch": spec.tiling.min_tiles,
        "ps_version": spec.projector.ps_version, "select_layer": -1, "template": spec.template,
        "torch_dtype": dtype, "use_thumbnail": spec.tiling.use_thumbnail, "use_backbone_lora": 0, "use_llm_lora": 0,
        "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": v.hidden_size,
            "image_size": v.image_size, "patch_size": v.patch_size, "intermediate_size": v.intermediate_size,
            "num_attention_heads": v.num_heads, "num_hidden_layers": v.num_layers, "layer_norm_eps": v.layer_norm_eps,
            "norm_type": "layer_norm", "qkv_bias": v.qkv_bias, "qk_normalization": False, "use_flash_attn": True,
            "hidden_act": "gelu", "num_channels": 3, "drop_path_rate": 0.0, "torch_dtype": dtype},
        "llm_config": _llm_config_original(spec.decoder, specials, dtype),
    }


def _config_hf(spec: ModelSpec, specials: dict[str, int], dtype: str) -> dict:
    v, d = spec.vision, spec.decoder
    bos, eos = _BOS_EOS[d.family]
    text = {"model_type": _HF_MODEL_TYPE[d.family], "hidden_size": d.hidden_size,
            "intermediate_size": d.intermediate_size, "num_attention_heads": d.num_heads,
            "num_hidden_layers": d.num_layers, "num_key_value_heads": d.num_kv_heads, "vocab_size": d.vocab_size,
            "rms_norm_eps": d.rms_norm_eps, "max_position_embeddings": d.max_position_embeddings,
            "tie_word_embeddings": False, "hidden_act": "silu", "dtype": dtype,
            "rope_parameters": {"rope_type": "default", "rope_theta": d.rope_theta},
            "bos_token_id": specials[bos], "eos_token_id": specials[eos], "pad_token_id": specials[eos]}
    if d.family == "internlm2":
        text["attention_bias"] = d.qkv_bias
    if d.long_rope:
        text["original_max_position_embeddings"] = d.long_rope.original_max_position_embeddings
        text["rope_parameters"] = {"rope_type": "longrope", "rope_theta": d.rope_theta,
                                   "short_factor": list(d.long_rope.short_factor),
                                   "long_factor": list(d.long_rope.long_factor),
                                   "original_max_position_embeddings": d.long_rope.original_max_position_embeddings}
    return {
        "architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl",
        "downsample_ratio": spec.projector.downsample_ratio, "image_seq_length": spec.image_tokens_per_tile,
        "image_token_id": specials["<IMG_CONTEXT>"], "projector_hidden_act": "gelu",
        "vision_feature_layer": -1, "vision_feature_select_strategy": "default", "tie_word_embeddings": False,
        "dtype": dtype,
        "vision_config": {
            "model_type": "internvl_vision", "hidden_size": v.hidden_size, "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads, "intermediate_size": v.intermediate_size,
            "attention_bias": v.qkv_bias, "use_qk_norm": False, "layer_norm_eps": v.layer_norm_eps,
            "image_size": [v.image_size] * 2, "patch_size": [v.patch_size] * 2, "norm_type": "layer_norm",
            "use_mean_pooling": True, "hidden_act": "gelu"},
        "text_config": text,
    }


def write_tiny_checkpoint(out, family: str = "qwen2", fmt: str = "original", dtype: str = "float32",
                          shards: int = 1, ps_version: str = "v2", seed: int = 0,
                          tokenizer_format: str = "json", original_max_position_embeddings: int = 320) -> Path:
    """Write a tiny random InternVL checkpoint (config.json, safetensors, tokenizer files) to `out`;
    original_max_position_embeddings is where Phi-3's LongRoPE switches to its long factors."""
    if family not in FAMILIES or fmt not in ("original", "hf") or dtype not in _DTYPES:
        raise ValueError(f"family={family!r} fmt={fmt!r} dtype={dtype!r}: expected one of {FAMILIES}, "
                         f"original/hf, {tuple(_DTYPES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specials = write_tokenizer(out, family, tokenizer_format)
    spec = tiny_spec(family, vocab_size=load_tokenizer(out).vocab_size, ps_version=ps_version,
                     original_max_position_embeddings=original_max_position_embeddings)
    if fmt == "hf" and ps_version != "v2":
        raise ValueError("the -hf format only has ps_version v2")
    tensors = to_checkpoint_names(random_weights(spec, seed), spec, fmt)
    _write_weights(out, tensors, dtype, shards)
    config = (_config_original if fmt == "original" else _config_hf)(spec, specials, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
