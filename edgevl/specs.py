"""Model shapes as data: one dataclass per part, a few named real shapes, and parsing of config.json.

Two on-disk formats are understood: InternVL's own (`InternVLChatModel`, `vision_config` / `llm_config`,
written by transformers 4.37 era code) and transformers' native "-hf" port (`InternVLForConditionalGeneration`,
`vision_config` / `text_config`). Both fill the same `ModelSpec`; nothing downstream looks at config dicts.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .preprocess import TilingConfig


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class VisionSpec:
    hidden_size: int = 1024
    num_layers: int = 24  # layers actually run: select_layer is resolved when parsing
    num_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 448
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class ProjectorSpec:
    vision_hidden_size: int = 1024
    llm_hidden_size: int = 896
    downsample_ratio: float = 0.5
    ps_version: str = "v2"  # v1 (InternVL-Chat-V1-5 era) skips the final transpose of the pixel shuffle

    @property
    def in_features(self) -> int:
        return self.vision_hidden_size * int(1 / self.downsample_ratio) ** 2


@dataclass(frozen=True)
class LongRope:
    """Phi-3 LongRoPE ("su" in 4.37 configs, "longrope" in transformers 5)."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    attention_factor: float


@dataclass(frozen=True)
class DecoderSpec:
    family: str  # qwen2 | internlm2 | phi3 | llama: selects the checkpoint weight map only
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    long_rope: LongRope | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class ModelSpec:
    vision: VisionSpec
    projector: ProjectorSpec
    decoder: DecoderSpec
    template: str
    tiling: TilingConfig = field(default_factory=TilingConfig)

    @property
    def image_tokens_per_tile(self) -> int:
        side = self.vision.image_size // self.vision.patch_size
        return int(side * self.projector.downsample_ratio) ** 2


# Real dimensions, for benchmarks on random weights (`--shape`); loading always reads config.json.
# Every Mini-InternVL model shares InternViT-300M-448px (VisionSpec's defaults).
KNOWN_SPECS: dict[str, ModelSpec] = {
    "internvl2-1b": ModelSpec(
        VisionSpec(), ProjectorSpec(llm_hidden_size=896),
        DecoderSpec("qwen2", 896, 24, 14, 2, 4864, 151655, 1e-6, 1e6, True, 32768), "Hermes-2"),
    "internvl2-2b": ModelSpec(
        VisionSpec(), ProjectorSpec(llm_hidden_size=2048),
        DecoderSpec("internlm2", 2048, 24, 16, 8, 8192, 92553, 1e-5, 1e6, False, 32768), "internlm2-chat"),
    "internvl2-4b": ModelSpec(
        VisionSpec(), ProjectorSpec(llm_hidden_size=3072),
        DecoderSpec("phi3", 3072, 32, 32, 32, 8192, 32020, 1e-5, 1e4, False, 131072), "phi3-chat"),
}

# LLM architectures per format: original checkpoints name the remote-code class, -hf ones a model_type.
_ORIGINAL_LLM_ARCHS = {"Qwen2ForCausalLM": "qwen2", "InternLM2ForCausalLM": "internlm2", "Phi3ForCausalLM": "phi3"}
_HF_TEXT_MODEL_TYPES = {"qwen2": "qwen2", "llama": "llama", "phi3": "phi3"}
# -hf checkpoints carry no template name; among Mini-InternVL models a Llama text config only arises from
# InternLM2 converted by transformers, hence internlm2-chat (from_pretrained(template=...) overrides).
DEFAULT_TEMPLATES = {"qwen2": "Hermes-2", "internlm2": "internlm2-chat", "phi3": "phi3-chat", "llama": "internlm2-chat"}


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; an InternVL checkpoint directory needs config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def checkpoint_format(config: dict, path: Path) -> str:
    """'original' (InternVLChatModel) or 'hf' (InternVLForConditionalGeneration)."""
    archs = config.get("architectures") or []
    if "InternVLChatModel" in archs or config.get("model_type") == "internvl_chat":
        return "original"
    if "InternVLForConditionalGeneration" in archs or config.get("model_type") == "internvl":
        return "hf"
    raise CheckpointError(
        f"{path}/config.json: architectures={archs} model_type={config.get('model_type')!r} is not an InternVL "
        "checkpoint (expected InternVLChatModel or InternVLForConditionalGeneration)")


def spec_from_config(config: dict, path: Path) -> ModelSpec:
    fmt = checkpoint_format(config, path)
    where = f"{path}/config.json"
    llm_key = "llm_config" if fmt == "original" else "text_config"
    vcfg, lcfg = _require(config, "vision_config", where), _require(config, llm_key, where)
    family = _llm_family(lcfg, fmt, f"{where}: {llm_key}")
    decoder = _decoder_spec(lcfg, family, f"{where}: {llm_key}")
    vision = _vision_spec(vcfg, config, fmt, f"{where}: vision_config")
    ratio = float(config.get("downsample_ratio", 0.5))
    ps_version = config.get("ps_version", "v2") if fmt == "original" else "v2"
    if ps_version not in ("v1", "v2"):
        raise CheckpointError(f"{where}: ps_version={ps_version!r}; expected 'v1' or 'v2'")
    template = config.get("template") or DEFAULT_TEMPLATES[family]
    tiling = _tiling(config, fmt, vision.image_size, path)
    projector = ProjectorSpec(vision.hidden_size, decoder.hidden_size, ratio, ps_version)
    return ModelSpec(vision, projector, decoder, template, tiling)


def _tiling(config: dict, fmt: str, image_size: int, path: Path) -> TilingConfig:
    if fmt == "original":
        dynamic, lo, hi = config.get("dynamic_image_size", True), config.get("min_dynamic_patch", 1), \
            config.get("max_dynamic_patch", 12)
        thumbnail = config.get("use_thumbnail", True)
    else:  # -hf checkpoints keep tiling in the image processor's config (GotOcr2ImageProcessor)
        pre_path = Path(path) / "preprocessor_config.json"
        pre = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
        dynamic, lo, hi = pre.get("crop_to_patches", True), pre.get("min_patches", 1), pre.get("max_patches", 12)
        thumbnail = True
    return TilingConfig(image_size=image_size, min_tiles=int(lo), max_tiles=int(hi) if dynamic else 1,
                        use_thumbnail=bool(thumbnail))


def _require(cfg: dict, key: str, where: str):
    if key not in cfg:
        raise CheckpointError(f"{where}: missing key {key!r}")
    return cfg[key]


def _llm_family(lcfg: dict, fmt: str, where: str) -> str:
    if fmt == "original":
        archs = lcfg.get("architectures") or []
        for arch in archs:
            if arch in _ORIGINAL_LLM_ARCHS:
                return _ORIGINAL_LLM_ARCHS[arch]
        raise CheckpointError(f"{where}: architectures={archs} is not a supported LLM "
                              f"(supported: {', '.join(_ORIGINAL_LLM_ARCHS)})")
    model_type = lcfg.get("model_type")
    if model_type not in _HF_TEXT_MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type={model_type!r} is not a supported LLM "
                              f"(supported: {', '.join(_HF_TEXT_MODEL_TYPES)})")
    return _HF_TEXT_MODEL_TYPES[model_type]


def _decoder_spec(lcfg: dict, family: str, where: str) -> DecoderSpec:
    get = lambda key: _require(lcfg, key, where)  # noqa: E731
    num_heads = int(get("num_attention_heads"))
    rope = lcfg.get("rope_parameters") or {}
    # 4.37-era configs keep rope_theta at the top level; transformers 5 moves it into rope_parameters.
    theta = float(lcfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
    spec = DecoderSpec(
        family=family,
        hidden_size=int(get("hidden_size")),
        num_layers=int(get("num_hidden_layers")),
        num_heads=num_heads,
        num_kv_heads=int(lcfg.get("num_key_value_heads") or num_heads),
        intermediate_size=int(get("intermediate_size")),
        vocab_size=int(get("vocab_size")),
        rms_norm_eps=float(lcfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        # Qwen2 always has q/k/v biases; InternLM2 records it as `bias`; Llama as `attention_bias`.
        qkv_bias=family == "qwen2" or bool(lcfg.get("bias", lcfg.get("attention_bias", False))),
        max_position_embeddings=int(lcfg.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(lcfg.get("tie_word_embeddings", False)),
    )
    scaling = lcfg.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
    return replace(spec, long_rope=_rope_scaling(scaling, lcfg, spec, where)) if scaling else spec


def _rope_scaling(scaling: dict, lcfg: dict, spec: DecoderSpec, where: str) -> LongRope | None:
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in ("su", "longrope"):
        original = int(scaling.get("original_max_position_embeddings")
                       or _require(lcfg, "original_max_position_embeddings", where))
        factor = spec.max_position_embeddings / original
        attention_factor = scaling.get("attention_factor") or (
            math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0)
        short, long_ = tuple(scaling["short_factor"]), tuple(scaling["long_factor"])
        if len(short) != spec.head_dim // 2 or len(long_) != spec.head_dim // 2:
            raise CheckpointError(f"{where}: rope_scaling factors have {len(short)}/{len(long_)} entries, "
                                  f"expected head_dim/2 = {spec.head_dim // 2}")
        return LongRope(short, long_, original, float(attention_factor))
    if kind == "dynamic":
        # InternLM2's dynamic NTK only changes RoPE past max_position_embeddings, which max_seq never exceeds.
        return None
    raise CheckpointError(f"{where}: rope_scaling type {kind!r} is not supported (supported: su/longrope, dynamic)")


def _vision_spec(vcfg: dict, config: dict, fmt: str, where: str) -> VisionSpec:
    get = lambda key: _require(vcfg, key, where)  # noqa: E731
    image_size = vcfg.get("image_size", 448)
    patch_size = vcfg.get("patch_size", 14)
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    patch_size = patch_size[0] if isinstance(patch_size, (list, tuple)) else patch_size
    if fmt == "original":
        image_size = config.get("force_image_size") or image_size
        select_layer = int(config.get("select_layer", -1))
        qkv_bias, qk_norm = bool(vcfg.get("qkv_bias", True)), vcfg.get("qk_normalization", False)
    else:
        select_layer = config.get("vision_feature_layer", -1)
        qkv_bias, qk_norm = bool(vcfg.get("attention_bias", False)), vcfg.get("use_qk_norm", False)
    if qk_norm or vcfg.get("norm_type", "layer_norm") != "layer_norm":
        raise CheckpointError(f"{where}: QK-norm / RMSNorm InternViT (the 6B encoder) is not supported; "
                              "Mini-InternVL uses InternViT-300M")
    total = int(get("num_hidden_layers"))
    if not isinstance(select_layer, int) or not -total <= select_layer < 0:
        raise CheckpointError(f"{where}: select_layer/vision_feature_layer={select_layer!r}; expected -1..-{total}")
    return VisionSpec(
        hidden_size=int(get("hidden_size")),
        num_layers=total + 1 + select_layer,  # hidden_states[select_layer] is the output of this many layers
        num_heads=int(get("num_attention_heads")),
        intermediate_size=int(get("intermediate_size")),
        image_size=int(image_size),
        patch_size=int(patch_size),
        layer_norm_eps=float(vcfg.get("layer_norm_eps", 1e-6)),
        qkv_bias=qkv_bias,
    )


def spec_to_dict(spec: ModelSpec) -> dict:
    return asdict(spec)


def spec_from_dict(d: dict) -> ModelSpec:
    """Inverse of spec_to_dict (an export manifest's `spec`)."""
    decoder = dict(d["decoder"])
    if decoder.get("long_rope"):
        lr = decoder["long_rope"]
        decoder["long_rope"] = LongRope(tuple(lr["short_factor"]), tuple(lr["long_factor"]),
                                        lr["original_max_position_embeddings"], lr["attention_factor"])
    return ModelSpec(VisionSpec(**d["vision"]), ProjectorSpec(**d["projector"]), DecoderSpec(**decoder),
                     d["template"], TilingConfig(**d["tiling"]))
