"""Checkpoint weight names mapped to ours, as data (gpt-fast's convert_hf_checkpoint `weight_map`).

Our names are format-free: `vision.*`, `projector.*`, `decoder.*`. Each entry maps one of our tensors to one
or more checkpoint tensors, concatenated along dim 0 (q/k/v and gate/up are fused in our modules); the few
real transforms (InternLM2's grouped `wqkv`) are small named functions. `expected_shapes` is the single source
of truth for what a spec's tensors look like: loading checks against it, the tiny-checkpoint writer draws from it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .specs import DecoderSpec, ModelSpec


def unpack_internlm2_wqkv(w: np.ndarray, spec: DecoderSpec) -> np.ndarray:
    """InternLM2 packs wqkv per KV group as (kv_heads, group_queries + 2, head_dim): the group's queries, then
    its key, then its value. Reorder to [all q heads; all k heads; all v heads]."""
    gs = spec.num_heads // spec.num_kv_heads + 2
    grouped = w.reshape(spec.num_kv_heads, gs, spec.head_dim, -1)  # a trailing 1 for the bias
    q, k, v = grouped[:, :-2], grouped[:, -2], grouped[:, -1]
    return np.concatenate([t.reshape(-1, grouped.shape[-1]) for t in (q, k, v)]).reshape(w.shape)


def pack_internlm2_wqkv(qkv: np.ndarray, spec: DecoderSpec) -> np.ndarray:
    """Inverse of `unpack_internlm2_wqkv` (used to write InternLM2-format test checkpoints)."""
    d, kv, groups = spec.head_dim, spec.num_kv_heads, spec.num_heads // spec.num_kv_heads
    q, k, v = np.split(qkv.reshape(qkv.shape[0], -1), [spec.num_heads * d, (spec.num_heads + kv) * d])
    grouped = [q.reshape(kv, groups, d, -1), k.reshape(kv, 1, d, -1), v.reshape(kv, 1, d, -1)]
    return np.concatenate(grouped, axis=1).reshape(qkv.shape)


@dataclass(frozen=True)
class FamilyWeights:
    """Where one LLM family keeps its tensors, relative to the LLM's prefix."""

    embed: str
    norm: str
    lm_head: str
    layer: dict[str, tuple[str, ...]]  # our per-layer name -> checkpoint names, concatenated along dim 0
    transforms: dict[str, Callable[[np.ndarray, DecoderSpec], np.ndarray]] = field(default_factory=dict)


_LLAMA_LAYER = {
    "attn_norm.weight": ("input_layernorm.weight",),
    "qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "o.weight": ("self_attn.o_proj.weight",),
    "mlp_norm.weight": ("post_attention_layernorm.weight",),
    "gate_up.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "down.weight": ("mlp.down_proj.weight",),
}

FAMILIES: dict[str, FamilyWeights] = {
    "qwen2": FamilyWeights("embed_tokens.weight", "norm.weight", "lm_head.weight", _LLAMA_LAYER),
    "llama": FamilyWeights("embed_tokens.weight", "norm.weight", "lm_head.weight", _LLAMA_LAYER),
    "phi3": FamilyWeights("embed_tokens.weight", "norm.weight", "lm_head.weight", {
        **_LLAMA_LAYER,
        "qkv.weight": ("self_attn.qkv_proj.weight",),
        "gate_up.weight": ("mlp.gate_up_proj.weight",),
    }),
    "internlm2": FamilyWeights("tok_embeddings.weight", "norm.weight", "output.weight", {
        "attn_norm.weight": ("attention_norm.weight",),
        "qkv.weight": ("attention.wqkv.weight",),
        "qkv.bias": ("attention.wqkv.bias",),
        "o.weight": ("attention.wo.weight",),
        "mlp_norm.weight": ("ffn_norm.weight",),
        "gate_up.weight": ("feed_forward.w1.weight", "feed_forward.w3.weight"),
        "down.weight": ("feed_forward.w2.weight",),
    }, transforms={"qkv.weight": unpack_internlm2_wqkv, "qkv.bias": unpack_internlm2_wqkv}),
}

_ORIGINAL_VISION_LAYER = {
    "norm1.weight": ("norm1.weight",), "norm1.bias": ("norm1.bias",),
    "qkv.weight": ("attn.qkv.weight",), "qkv.bias": ("attn.qkv.bias",),
    "proj.weight": ("attn.proj.weight",), "proj.bias": ("attn.proj.bias",),
    "ls1": ("ls1",), "ls2": ("ls2",),
    "norm2.weight": ("norm2.weight",), "norm2.bias": ("norm2.bias",),
    "fc1.weight": ("mlp.fc1.weight",), "fc1.bias": ("mlp.fc1.bias",),
    "fc2.weight": ("mlp.fc2.weight",), "fc2.bias": ("mlp.fc2.bias",),
}
_HF_VISION_LAYER = {
    "norm1.weight": ("layernorm_before.weight",), "norm1.bias": ("layernorm_before.bias",),
    "qkv.weight": tuple(f"attention.{p}_proj.weight" for p in "qkv"),
    "qkv.bias": tuple(f"attention.{p}_proj.bias" for p in "qkv"),
    "proj.weight": ("attention.projection_layer.weight",), "proj.bias": ("attention.projection_layer.bias",),
    "ls1": ("lambda_1",), "ls2": ("lambda_2",),
    "norm2.weight": ("layernorm_after.weight",), "norm2.bias": ("layernorm_after.bias",),
    "fc1.weight": ("mlp.fc1.weight",), "fc1.bias": ("mlp.fc1.bias",),
    "fc2.weight": ("mlp.fc2.weight",), "fc2.bias": ("mlp.fc2.bias",),
}


@dataclass(frozen=True)
class FormatLayout:
    """Prefixes of one on-disk format (after `normalize_hf_name` for -hf checkpoints)."""

    vision_globals: dict[str, str]
    vision_layer_prefix: str
    vision_layer: dict[str, tuple[str, ...]]
    projector: dict[str, str]
    llm_prefix: str
    lm_head_prefix: str


LAYOUTS = {
    "original": FormatLayout(
        {"patch_embed.weight": "vision_model.embeddings.patch_embedding.weight",
         "patch_embed.bias": "vision_model.embeddings.patch_embedding.bias",
         "cls_token": "vision_model.embeddings.class_embedding",
         "pos_embed": "vision_model.embeddings.position_embedding"},
        "vision_model.encoder.layers.", _ORIGINAL_VISION_LAYER,
        {"norm": "mlp1.0", "fc1": "mlp1.1", "fc2": "mlp1.3"},
        "language_model.model.", "language_model."),
    "hf": FormatLayout(
        {"patch_embed.weight": "vision_tower.embeddings.patch_embeddings.projection.weight",
         "patch_embed.bias": "vision_tower.embeddings.patch_embeddings.projection.bias",
         "cls_token": "vision_tower.embeddings.cls_token",
         "pos_embed": "vision_tower.embeddings.position_embeddings"},
        "vision_tower.encoder.layer.", _HF_VISION_LAYER,
        {"norm": "multi_modal_projector.layer_norm", "fc1": "multi_modal_projector.linear_1",
         "fc2": "multi_modal_projector.linear_2"},
        "language_model.", ""),
}


def normalize_hf_name(name: str) -> str:
    """-hf checkpoints exist in two layouts (transformers <4.52 llava-style and the current `model.` one);
    map both to `vision_tower.*`, `multi_modal_projector.*`, `language_model.*`, `lm_head.*`."""
    if name.startswith("model."):
        name = name[len("model."):]
    if name.startswith("language_model.model."):
        name = "language_model." + name[len("language_model.model."):]
    if name.startswith("language_model.lm_head."):
        name = name[len("language_model."):]
    return name


@dataclass(frozen=True)
class WeightEntry:
    ours: str
    sources: tuple[str, ...]
    transform: Callable[[np.ndarray, DecoderSpec], np.ndarray] | None = None


def weight_entries(spec: ModelSpec, fmt: str) -> list[WeightEntry]:
    """Every tensor our modules need, with where it lives in a checkpoint of format `fmt`."""
    layout, fam = LAYOUTS[fmt], FAMILIES[spec.decoder.family]
    entries = [WeightEntry(f"vision.{k}", (v,)) for k, v in layout.vision_globals.items()]
    for i in range(spec.vision.num_layers):
        for ours, srcs in layout.vision_layer.items():
            if ours == "qkv.bias" and not spec.vision.qkv_bias:
                continue
            entries.append(WeightEntry(f"vision.layers.{i}.{ours}",
                                       tuple(f"{layout.vision_layer_prefix}{i}.{s}" for s in srcs)))
    for ours, src in layout.projector.items():
        entries += [WeightEntry(f"projector.{ours}.{p}", (f"{src}.{p}",)) for p in ("weight", "bias")]
    llm = layout.llm_prefix
    entries.append(WeightEntry("decoder.embed.weight", (llm + fam.embed,)))
    for i in range(spec.decoder.num_layers):
        for ours, srcs in fam.layer.items():
            if ours == "qkv.bias" and not spec.decoder.qkv_bias:
                continue
            entries.append(WeightEntry(f"decoder.layers.{i}.{ours}", tuple(f"{llm}layers.{i}.{s}" for s in srcs),
                                       fam.transforms.get(ours)))
    entries.append(WeightEntry("decoder.norm.weight", (llm + fam.norm,)))
    entries.append(WeightEntry("decoder.lm_head.weight", (layout.lm_head_prefix + fam.lm_head,)))
    return entries


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    v, p, d = spec.vision, spec.projector, spec.decoder
    c, ps = v.hidden_size, v.patch_size
    shapes = {
        "vision.patch_embed.weight": (c, 3, ps, ps), "vision.patch_embed.bias": (c,),
        "vision.cls_token": (1, 1, c), "vision.pos_embed": (1, v.num_patches + 1, c),
    }
    for i in range(v.num_layers):
        layer = {"norm1.weight": (c,), "norm1.bias": (c,), "qkv.weight": (3 * c, c), "qkv.bias": (3 * c,),
                 "proj.weight": (c, c), "proj.bias": (c,), "ls1": (c,), "ls2": (c,),
                 "norm2.weight": (c,), "norm2.bias": (c,),
                 "fc1.weight": (v.intermediate_size, c), "fc1.bias": (v.intermediate_size,),
                 "fc2.weight": (c, v.intermediate_size), "fc2.bias": (c,)}
        if not v.qkv_bias:
            del layer["qkv.bias"]
        shapes.update({f"vision.layers.{i}.{k}": s for k, s in layer.items()})
    shapes.update({"projector.norm.weight": (p.in_features,), "projector.norm.bias": (p.in_features,),
                   "projector.fc1.weight": (p.llm_hidden_size, p.in_features),
                   "projector.fc1.bias": (p.llm_hidden_size,),
                   "projector.fc2.weight": (p.llm_hidden_size, p.llm_hidden_size),
                   "projector.fc2.bias": (p.llm_hidden_size,)})
    h, qkv = d.hidden_size, (d.num_heads + 2 * d.num_kv_heads) * d.head_dim
    shapes["decoder.embed.weight"] = (d.vocab_size, h)
    for i in range(d.num_layers):
        layer = {"attn_norm.weight": (h,), "qkv.weight": (qkv, h), "qkv.bias": (qkv,),
                 "o.weight": (h, d.num_heads * d.head_dim), "mlp_norm.weight": (h,),
                 "gate_up.weight": (2 * d.intermediate_size, h), "down.weight": (h, d.intermediate_size)}
        if not d.qkv_bias:
            del layer["qkv.bias"]
        shapes.update({f"decoder.layers.{i}.{k}": s for k, s in layer.items()})
    shapes["decoder.norm.weight"] = (h,)
    shapes["decoder.lm_head.weight"] = (d.vocab_size, h)
    return shapes
