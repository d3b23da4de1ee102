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


# Far above any real file: config.json and the shard index are kilobytes, a manifest at most a few hundred.
MAX_JSON_BYTES = 16 << 20
MAX_LAYERS = 1024  # far above any InternVL part (InternViT-6B has 45, the largest LLM 80); bounds the weight table
MAX_SIZE = 2**31 - 1  # every real size is far below; a larger one is a corrupt file, and would overflow float math
_REQUIRED = object()
_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "an array",
               dict: "an object"}


def snippet(value) -> str:
    """A value for an error message, cut short: a hostile file's strings and arrays can be megabytes."""
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_json(path: Path, error: type[ValueError] = CheckpointError):
    """The value in a small JSON file (config, shard index, manifest); `error` naming the file if it is not one."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise error(f"{path}: {size} bytes; a {path.name} is kilobytes, refusing to read over {MAX_JSON_BYTES}")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, an integer of 4300+ digits
        raise error(f"{path}: not valid JSON ({e})") from None


def _as_kind(value, kind):
    """value as `kind`, or None if it is not one (JSON's true/false are never numbers; numbers must be finite)."""
    if isinstance(value, bool) != (kind is bool):
        return None
    if kind is float and isinstance(value, (int, float)):
        try:
            value = float(value)
        except OverflowError:
            return None
        return value if math.isfinite(value) else None
    return value if isinstance(value, kind) else None


class Fields:
    """One JSON object of a file edgevl reads but may not have written (config.json, manifest.json). Every read
    checks type and range, and a bad value raises `error` naming the file and the dotted key."""

    def __init__(self, data, file: Path, error: type[ValueError] = CheckpointError, key: str = ""):
        if not isinstance(data, dict):
            raise error(f"{file}: {key or 'the top level'} is {snippet(data)}; expected a JSON object")
        self.data, self.file, self.error, self.key = data, Path(file), error, key

    def where(self, key: str) -> str:
        return f"{self.key}.{key}" if self.key else key

    def fail(self, key: str, problem: str):
        raise self.error(f"{self.file}: {self.where(key)} {problem}")

    def get(self, key: str, kind: type, default=_REQUIRED, *, positive: bool = False, minimum=None, maximum=None,
            choices=None):
        """data[key] as `kind` (float accepts integers; an object comes back as Fields), checked against the
        bounds. Absent or null gives `default` (transformers writes unset options as null), or an error if none."""
        value = self.data.get(key)
        if value is None:
            if default is _REQUIRED:
                self.fail(key, "is null" if key in self.data else "is missing")
            return Fields(default, self.file, self.error, self.where(key)) if isinstance(default, dict) else default
        typed = _as_kind(value, kind)
        if typed is None:
            self.fail(key, f"= {snippet(value)}: expected {_KIND_NAMES[kind]}")
        if choices is not None and typed not in choices:
            self.fail(key, f"= {snippet(value)}: expected one of {', '.join(map(str, choices))}")
        low = 1 if positive and kind is int else minimum
        bounds = [f">= {low}" if low is not None else "> 0" if positive else "",
                  f"<= {maximum}" if maximum is not None else ""]
        if (typed < low if low is not None else positive and typed <= 0) or maximum is not None and typed > maximum:
            self.fail(key, f"= {snippet(typed)}: expected {' and '.join(b for b in bounds if b)}")
        return Fields(typed, self.file, self.error, self.where(key)) if kind is dict else typed

    def array(self, key: str, kind: type, default=_REQUIRED, *, length: int | None = None, **bounds) -> list:
        """data[key] as a list of `kind`, each item checked as `get` checks one value."""
        values = self.get(key, list, default)
        if values is default:
            return default
        if length is not None and len(values) != length:
            self.fail(key, f"has {len(values)} entries; expected {length}")
        items = Fields({f"{key}[{i}]": v for i, v in enumerate(values)}, self.file, self.error, self.key)
        return [items.get(name, kind, **bounds) for name in items.data]

    def table(self, key: str, kind: type) -> dict:
        """data[key]: a non-empty object, every value of `kind`."""
        section = self.get(key, dict)
        if not section.data:
            self.fail(key, "is empty")
        return {name: section.get(name, kind) for name in section.data}


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; an InternVL checkpoint directory needs config.json")
    return Fields(read_json(path), path).data


def checkpoint_format(config: dict, path: Path) -> str:
    """'original' (InternVLChatModel) or 'hf' (InternVLForConditionalGeneration)."""
    cfg = Fields(config, Path(path) / "config.json")
    archs, model_type = cfg.array("architectures", str, []), cfg.get("model_type", str, None)
    if "InternVLChatModel" in archs or model_type == "internvl_chat":
        return "original"
    if "InternVLForConditionalGeneration" in archs or model_type == "internvl":
        return "hf"
    raise CheckpointError(
        f"{path}/config.json: architectures={archs} model_type={model_type!r} is not an InternVL "
        "checkpoint (expected InternVLChatModel or InternVLForConditionalGeneration)")


def spec_from_config(config: dict, path: Path) -> ModelSpec:
    fmt = checkpoint_format(config, path)
    cfg = Fields(config, Path(path) / "config.json")
    vcfg, lcfg = cfg.get("vision_config", dict), cfg.get("llm_config" if fmt == "original" else "text_config", dict)
    family = _llm_family(lcfg, fmt)
    decoder = _decoder_spec(lcfg, family, cfg)
    vision = _vision_spec(vcfg, cfg, fmt)
    ratio = _downsample_ratio(cfg, vision)
    ps_version = cfg.get("ps_version", str, "v2", choices=("v1", "v2")) if fmt == "original" else "v2"
    template = cfg.get("template", str, None) or DEFAULT_TEMPLATES[family]
    tiling = _tiling(cfg, fmt, vision.image_size, path)
    projector = ProjectorSpec(vision.hidden_size, decoder.hidden_size, ratio, ps_version)
    return ModelSpec(vision, projector, decoder, template, tiling)


def _size(cfg: Fields, key: str, default=_REQUIRED, maximum: int = MAX_SIZE) -> int:
    return cfg.get(key, int, default, positive=True, maximum=maximum)


def _downsample_ratio(cfg: Fields, vision: VisionSpec) -> float:
    """The pixel shuffle folds n x n patches into one token: the ratio is 1/n, n dividing the patches per side."""
    ratio = cfg.get("downsample_ratio", float, 0.5, positive=True, maximum=1)
    side = vision.image_size // vision.patch_size
    n = round(1 / ratio) if 1 / ratio <= side else 0
    if not n or abs(n * ratio - 1) > 1e-6 or side % n:
        cfg.fail("downsample_ratio", f"= {ratio}: expected 1/n for an n that divides the {side} patches per side")
    return ratio


def _tiling(cfg: Fields, fmt: str, image_size: int, path: Path) -> TilingConfig:
    if fmt == "original":
        source, thumbnail = cfg, cfg.get("use_thumbnail", bool, True)
        dynamic_key, low_key, high_key = "dynamic_image_size", "min_dynamic_patch", "max_dynamic_patch"
    else:  # -hf checkpoints keep tiling in the image processor's config (GotOcr2ImageProcessor)
        pre_path = Path(path) / "preprocessor_config.json"
        source = Fields(read_json(pre_path) if pre_path.is_file() else {}, pre_path)
        dynamic_key, low_key, high_key = "crop_to_patches", "min_patches", "max_patches"
        thumbnail = True
    dynamic, low, high = source.get(dynamic_key, bool, True), _size(source, low_key, 1), _size(source, high_key, 12)
    if not dynamic:
        return TilingConfig(image_size=image_size, min_tiles=1, max_tiles=1, use_thumbnail=thumbnail)
    if low > high:
        source.fail(low_key, f"= {low}: more than {source.where(high_key)} = {high}")
    return TilingConfig(image_size=image_size, min_tiles=low, max_tiles=high, use_thumbnail=thumbnail)


def _llm_family(lcfg: Fields, fmt: str) -> str:
    where = f"{lcfg.file}: {lcfg.key}"
    if fmt == "original":
        archs = lcfg.array("architectures", str, [])
        for arch in archs:
            if arch in _ORIGINAL_LLM_ARCHS:
                return _ORIGINAL_LLM_ARCHS[arch]
        raise CheckpointError(f"{where}: architectures={archs} is not a supported LLM "
                              f"(supported: {', '.join(_ORIGINAL_LLM_ARCHS)})")
    model_type = lcfg.get("model_type", str, None)
    if model_type not in _HF_TEXT_MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type={model_type!r} is not a supported LLM "
                              f"(supported: {', '.join(_HF_TEXT_MODEL_TYPES)})")
    return _HF_TEXT_MODEL_TYPES[model_type]


def _heads(cfg: Fields, hidden_size: int, heads_key: str) -> int:
    heads = _size(cfg, heads_key)
    if hidden_size % heads:
        cfg.fail("hidden_size", f"= {hidden_size}: not divisible by {cfg.where(heads_key)} = {heads}")
    return heads


def _decoder_spec(lcfg: Fields, family: str, cfg: Fields) -> DecoderSpec:
    hidden_size = _size(lcfg, "hidden_size")
    num_heads = _heads(lcfg, hidden_size, "num_attention_heads")
    if hidden_size // num_heads % 2:
        lcfg.fail("hidden_size", f"= {hidden_size}: gives an odd head size over {num_heads} heads (RoPE rotates pairs)")
    num_kv_heads = _size(lcfg, "num_key_value_heads", num_heads)
    if num_heads % num_kv_heads:
        lcfg.fail("num_key_value_heads", f"= {num_kv_heads}: does not divide num_attention_heads = {num_heads}")
    rope = lcfg.get("rope_parameters", dict, {})
    # 4.37-era configs keep rope_theta at the top level; transformers 5 moves it into rope_parameters.
    theta = lcfg.get("rope_theta", float, rope.get("rope_theta", float, 10000.0, positive=True), positive=True)
    spec = DecoderSpec(
        family=family,
        hidden_size=hidden_size,
        num_layers=_size(lcfg, "num_hidden_layers", maximum=MAX_LAYERS),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=_size(lcfg, "intermediate_size"),
        vocab_size=_size(lcfg, "vocab_size"),
        rms_norm_eps=lcfg.get("rms_norm_eps", float, 1e-6, positive=True),
        rope_theta=theta,
        # Qwen2 always has q/k/v biases; InternLM2 records it as `bias`; Llama as `attention_bias`.
        qkv_bias=family == "qwen2" or lcfg.get("bias", bool, lcfg.get("attention_bias", bool, False)),
        max_position_embeddings=_size(lcfg, "max_position_embeddings", 32768),
        tie_word_embeddings=lcfg.get("tie_word_embeddings", bool, cfg.get("tie_word_embeddings", bool, False)),
    )
    scaling = lcfg.get("rope_scaling", dict, {})
    if not scaling.data and rope.get("rope_type", str, "default") != "default":
        scaling = rope
    return replace(spec, long_rope=_rope_scaling(scaling, lcfg, spec)) if scaling.data else spec


def _rope_scaling(scaling: Fields, lcfg: Fields, spec: DecoderSpec) -> LongRope | None:
    kind = scaling.get("rope_type", str, scaling.get("type", str, None))
    if kind in ("su", "longrope"):
        # >= 2: the attention factor divides by its logarithm.
        key = "original_max_position_embeddings"
        original = scaling.get(key, int, None, minimum=2, maximum=MAX_SIZE) or \
            lcfg.get(key, int, minimum=2, maximum=MAX_SIZE)
        factor = spec.max_position_embeddings / original
        attention_factor = scaling.get("attention_factor", float, None, minimum=0) or (
            math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0)
        half = spec.head_dim // 2
        short = scaling.array("short_factor", float, length=half)
        long_ = scaling.array("long_factor", float, length=half)
        return LongRope(tuple(short), tuple(long_), original, float(attention_factor))
    if kind == "dynamic":
        # InternLM2's dynamic NTK only changes RoPE past max_position_embeddings, which max_seq never exceeds
        # (export_model and TorchBackend refuse a larger one; an export's runtime max_seq is at most its own).
        return None
    raise CheckpointError(f"{scaling.file}: {scaling.key}: type {kind!r} is not supported "
                          "(supported: su/longrope, dynamic)")


def _square(vcfg: Fields, key: str, default: int) -> int:
    """image_size / patch_size: an integer (original format) or [height, width] (-hf); InternViT's are square."""
    if not isinstance(vcfg.data.get(key), list):
        return _size(vcfg, key, default)
    height, width = vcfg.array(key, int, length=2, positive=True, maximum=MAX_SIZE)
    if height != width:
        vcfg.fail(key, f"= {[height, width]}: expected a square (InternViT's tiles are square)")
    return height


def _vision_spec(vcfg: Fields, cfg: Fields, fmt: str) -> VisionSpec:
    image_size, patch_size = _square(vcfg, "image_size", 448), _square(vcfg, "patch_size", 14)
    if fmt == "original":
        image_size = _size(cfg, "force_image_size", image_size)
        layer_key, qkv_bias = "select_layer", vcfg.get("qkv_bias", bool, True)
        qk_norm = vcfg.get("qk_normalization", bool, False)
    else:
        layer_key, qkv_bias = "vision_feature_layer", vcfg.get("attention_bias", bool, False)
        qk_norm = vcfg.get("use_qk_norm", bool, False)
    if qk_norm or vcfg.get("norm_type", str, "layer_norm") != "layer_norm":
        raise CheckpointError(f"{vcfg.file}: {vcfg.key}: QK-norm / RMSNorm InternViT (the 6B encoder) is not "
                              "supported; Mini-InternVL uses InternViT-300M")
    if image_size % patch_size:
        vcfg.fail("patch_size", f"= {patch_size}: does not divide the image size {image_size}")
    total = _size(vcfg, "num_hidden_layers", maximum=MAX_LAYERS)
    select_layer = cfg.get(layer_key, int, -1, minimum=-total, maximum=-1)
    hidden_size = _size(vcfg, "hidden_size")
    return VisionSpec(
        hidden_size=hidden_size,
        num_layers=total + 1 + select_layer,  # hidden_states[select_layer] is the output of this many layers
        num_heads=_heads(vcfg, hidden_size, "num_attention_heads"),
        intermediate_size=_size(vcfg, "intermediate_size"),
        image_size=image_size,
        patch_size=patch_size,
        layer_norm_eps=vcfg.get("layer_norm_eps", float, 1e-6, positive=True),
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
