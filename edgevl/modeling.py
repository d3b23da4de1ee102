"""Export-friendly PyTorch modules: InternViT + pixel shuffle + projector, and one Llama-family decoder.

Plain nn.Modules with our own weight names (see weights.py); no transformers objects. The decoder's KV cache is
an explicit tensor interface (a list of per-layer (key, value) tensors in, the grown list out) because that is
what the ONNX / TensorRT export traces. Family differences (Qwen2 / InternLM2 / Phi-3) are only in the weight map
and the spec: q/k/v bias, RoPE base and Phi-3's LongRoPE factors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .specs import DecoderSpec, ModelSpec, ProjectorSpec, VisionSpec

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: [B, kv_heads, seq, head_dim] each


class VisionLayer(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        c = spec.hidden_size
        self.num_heads = spec.num_heads
        self.norm1 = nn.LayerNorm(c, eps=spec.layer_norm_eps)
        self.qkv = nn.Linear(c, 3 * c, bias=spec.qkv_bias)
        self.proj = nn.Linear(c, c)
        self.ls1 = nn.Parameter(torch.ones(c))
        self.norm2 = nn.LayerNorm(c, eps=spec.layer_norm_eps)
        self.fc1 = nn.Linear(c, spec.intermediate_size)
        self.fc2 = nn.Linear(spec.intermediate_size, c)
        self.ls2 = nn.Parameter(torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        x = x + self.ls1 * self.proj(attn.transpose(1, 2).reshape(b, n, c))
        return x + self.ls2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisionEncoder(nn.Module):
    """InternViT: patch embedding + CLS + learned positions, pre-norm layers with layer scale, no final norm."""

    def __init__(self, spec: VisionSpec):
        super().__init__()
        c = spec.hidden_size
        self.patch_embed = nn.Conv2d(3, c, kernel_size=spec.patch_size, stride=spec.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        # Fixed 448 input, so the reference's bicubic resampling of the position table is the identity.
        self.pos_embed = nn.Parameter(torch.zeros(1, spec.num_patches + 1, c))
        self.layers = nn.ModuleList(VisionLayer(spec) for _ in range(spec.num_layers))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for layer in self.layers:
            x = layer(x)
        return x


def pixel_shuffle(x: torch.Tensor, ratio: float, ps_version: str) -> torch.Tensor:
    """InternVL's pixel shuffle on [T, W, H, C] features (the reference's naming), giving 4x channels."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * ratio), int(c / ratio)).permute(0, 2, 1, 3)
    x = x.reshape(n, int(h * ratio), int(w * ratio), int(c / (ratio * ratio)))
    # v1 (InternVL-Chat-V1-5 era) omitted the final transpose, so its token order is transposed.
    return x if ps_version == "v1" else x.permute(0, 2, 1, 3)


class Projector(nn.Module):
    def __init__(self, spec: ProjectorSpec):
        super().__init__()
        self.norm = nn.LayerNorm(spec.in_features)  # eps 1e-5: nn.LayerNorm's default, as in the reference
        self.fc1 = nn.Linear(spec.in_features, spec.llm_hidden_size)
        self.fc2 = nn.Linear(spec.llm_hidden_size, spec.llm_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class VisionModel(nn.Module):
    """pixel_values [T, 3, 448, 448] -> image_embeds [T, 256, H_llm]: what vision.onnx exports."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.ratio, self.ps_version = spec.projector.downsample_ratio, spec.projector.ps_version
        self.vision = VisionEncoder(spec.vision)
        self.projector = Projector(spec.projector)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.vision(pixel_values.to(self.vision.patch_embed.weight.dtype))[:, 1:]  # drop CLS
        side = int(x.shape[1] ** 0.5)
        x = pixel_shuffle(x.reshape(x.shape[0], side, side, -1), self.ratio, self.ps_version)
        return self.projector(x.reshape(x.shape[0], -1, x.shape[-1]))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Rope(nn.Module):
    """Rotary embedding computed from position ids inside the graph (no cached tables to outgrow)."""

    def __init__(self, spec: DecoderSpec):
        super().__init__()
        exponent = torch.arange(0, spec.head_dim, 2, dtype=torch.int64).float() / spec.head_dim
        base = spec.rope_theta ** exponent
        lr = spec.long_rope
        short = torch.tensor(lr.short_factor) if lr else 1.0
        self.register_buffer("inv_freq", 1.0 / (short * base), persistent=False)
        long_ = 1.0 / (torch.tensor(lr.long_factor) * base) if lr else None
        self.register_buffer("inv_freq_long", long_, persistent=False)
        self.original_max = lr.original_max_position_embeddings if lr else 0
        self.attention_factor = lr.attention_factor if lr else 1.0

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if self.inv_freq_long is not None:
            # LongRoPE as transformers 5 computes it (modeling_rope_utils: dynamic_rope_update's
            # longrope_frequency_update, and Phi3RotaryEmbedding.forward): seq_len = max(position_ids) + 1, the long
            # factors for every position of the call when seq_len > original_max_position_embeddings, else the
            # short ones; cos and sin times attention_factor. Keys already cached keep the rotation they were
            # computed with: InternVLForConditionalGeneration's generate extends the cache across the switch (only
            # Phi3ForCausalLM's own prepare_inputs_for_generation recomputes it there).
            inv_freq = torch.where(position_ids.max() + 1 > self.original_max, self.inv_freq_long, inv_freq)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        h, d = spec.hidden_size, spec.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, d
        self.attn_norm = RMSNorm(h, spec.rms_norm_eps)
        self.qkv = nn.Linear(h, (spec.num_heads + 2 * spec.num_kv_heads) * d, bias=spec.qkv_bias)
        self.o = nn.Linear(spec.num_heads * d, h, bias=False)
        self.mlp_norm = RMSNorm(h, spec.rms_norm_eps)
        self.gate_up = nn.Linear(h, 2 * spec.intermediate_size, bias=False)
        self.down = nn.Linear(spec.intermediate_size, h, bias=False)

    def forward(self, x, cos, sin, past_k, past_v, mask):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim],
            dim=-1)
        q = _rotate(q.view(b, s, self.num_heads, self.head_dim).transpose(1, 2), cos, sin)
        k = _rotate(k.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        # Grouped-query attention without expanding K/V to every query head: each KV head's query group is
        # folded into the row axis, so the graph reads the cache once per step (no Expand, no copy of it).
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(b, self.num_kv_heads, groups * s, self.head_dim)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.head_dim ** -0.5 + mask
        attn = torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)
        attn = attn.reshape(b, self.num_heads, s, self.head_dim)
        x = x + self.o(attn.transpose(1, 2).reshape(b, s, -1))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up), k, v


class LanguageModel(nn.Module):
    """inputs_embeds [B, S, H] + position_ids [B, S] + past KV -> logits + present KV."""

    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.rope = Rope(spec)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)

    def empty_cache(self, batch: int = 1) -> KVCache:
        p = next(self.parameters())
        shape = (batch, self.spec.num_kv_heads, 0, self.spec.head_dim)
        return [(p.new_zeros(shape), p.new_zeros(shape)) for _ in self.layers]

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, cache: KVCache,
                last_only: bool = True, fixed_capacity: bool = False) -> tuple[torch.Tensor, KVCache]:
        """fixed_capacity: how the cache is updated. False: the step's keys and values are appended (present is
        [B, kv, past + S, d]). True: cache is [B, kv, capacity, d] whatever the position and present has the same
        shape, the step's rows scattered in at position_ids, so no shape depends on the position (what a CUDA graph
        needs). Then the layers attend over capacity + S keys: the cached rows before the step's first position
        (rows from it on are stale, from an older sequence or never written, and masked) and the step's own
        causally. Same keys, same values, same logits either way."""
        s, cached = inputs_embeds.shape[1], cache[0][0].shape[2]
        device = inputs_embeds.device
        cos, sin = self.rope(position_ids)
        cos, sin = cos[:, None].to(inputs_embeds.dtype), sin[:, None].to(inputs_embeds.dtype)
        # Built from shapes and positions so it traces. Additive with a finite minimum (not -inf): no row is ever
        # fully masked, so the graph needs no NaN guard. Tiled once per query group to match the grouped row layout
        # of DecoderLayer's scores.
        rows = torch.arange(s, device=device)
        if fixed_capacity:
            visible = torch.cat([(torch.arange(cached, device=device) < position_ids[0, :1])[None].expand(s, -1),
                                 rows[None, :] <= rows[:, None]], dim=1)
            index = position_ids[0].view(1, 1, s, 1).expand(1, self.spec.num_kv_heads, s, self.spec.head_dim)
        else:  # causal over the new tokens, everything in the past visible
            visible = torch.arange(cached + s, device=device)[None, :] <= (cached + rows[:, None])
        groups = self.spec.num_heads // self.spec.num_kv_heads
        mask = torch.zeros(visible.shape, dtype=torch.float32, device=device).masked_fill(
            ~visible, torch.finfo(torch.float32).min).repeat(groups, 1)
        x, present = inputs_embeds, []
        for layer, (pk, pv) in zip(self.layers, cache):
            x, k, v = layer(x, cos, sin, pk, pv, mask)
            if fixed_capacity:
                k, v = pk.scatter(2, index, k.narrow(2, cached, s)), pv.scatter(2, index, v.narrow(2, cached, s))
            present.append((k, v))
        x = self.norm(x[:, -1:] if last_only else x)  # prefill needs one row of logits, not S x vocab
        return self.lm_head(x).float(), present
