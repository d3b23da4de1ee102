"""What `edgevl build` asks TensorRT for, as plain data: precisions, optimization profiles, the graph each
engine is built from, and the manifest's `tensorrt` section. No TensorRT here, so all of it is tested on CPU.

KV cache and profiles: one decoder plan, built from one of the export's two decoder graphs (--kv-cache):
- concat (default, decoder.onnx): reads past [1, kv, P, d] and writes present [1, kv, P + S, d], both dense. The
  runtime keeps two device buffers of max_seq capacity per KV tensor and ping-pongs them (present of step t is
  bound as past of step t + 1, no copy, no host round trip); in place is impossible, a dense [kv, P + 1, d] moves
  every head's rows relative to [kv, P, d]. Profiles:
    prefill: seq 1..max_seq, past 0 (a prompt always starts a new sequence; `Decoder.prefill` says so);
    decode:  seq 1,          past 1..max_seq - 1.
  Each is tuned at its opt shape (prefill at a one-image prompt, decode at mid-context).
- fixed (decoder_fixed.onnx): past and present are [1, kv, max_seq, d] whatever the position, the step's rows
  scattered in at position_ids, so every shape but the prompt length is static and the decode step can be a
  captured CUDA graph (TensorRTBackend cuda_graph=True). The same graph serves prefill and decode, so one plan
  holds the weights once (a second, decode-only engine would hold a second copy: 1-8 GB on a Jetson whose GPU
  shares 8-64 GB with the CPU). The cost is O(max_seq) per step instead of O(position) (attention and the cache
  copies span the whole capacity), so it is opt-in: it pays off where launch overhead dominates (small models,
  slow host cores) and max_seq is not much larger than the conversations. Profiles:
    prefill: seq 2..max_seq; decode: seq 1 (a one-token prompt is a decode step at position 0).
The runtime picks the profile whose ranges contain the call's shapes (edgevl.backends.tensorrt_backend.profile_for).
"""
from __future__ import annotations

from edgevl.manifest import GPU, Limits, Manifest, Plans, Profile, TensorRTKVCache, TensorRTSection
from edgevl.precisions import build_recipe

# Graph precision -> (oldest TensorRT, oldest compute capability, why). INT4 weight-only (blocked INT4
# DequantizeLinear before a MatMul) arrived in TensorRT 10.0 (release notes; onnx-tensorrt 10.0 EA: "Added support
# for INT4 quantization"); NVIDIA Model Optimizer's support matrix lists W4A16 for "Ampere and later" (sm_80+:
# Orin is sm_87, Thor sm_110). Checked before anything is built.
GRAPH_REQUIREMENTS = {
    "int4-weight-only": ((10, 0), (8, 0), "INT4 weight-only decoders (blocked INT4 DequantizeLinear)"),
}
KV_CACHE_LAYOUTS = {"concat": "decoder", "fixed": "decoder_fixed"}  # --kv-cache -> manifest graphs key
DEFAULT_KV_CACHE = "concat"
KV_CACHE_SECTIONS = {
    "concat": TensorRTKVCache("concat-ping-pong", "float16",
                              note="two max_seq-capacity device buffers per KV tensor; present(t) is past(t+1)"),
    "fixed": TensorRTKVCache("fixed-ping-pong", "float16", cuda_graph=True,
                             note="two [1, kv, max_seq, d] device buffers per KV tensor (zeroed once: rows past the "
                                  "position are masked, never NaN); present(t) is past(t+1); static decode shapes"),
}
DEFAULT_PRECISION = "fp16"
# Tile counts tuned for: one tile (video frames, small images), 2x3 + thumbnail, 12 + thumbnail.
COMMON_TILE_COUNTS = (1, 7, 13)
PREFILL_OPT_TOKENS = 256 * 7 + 128  # a 6-tile image + thumbnail and a short question
DEFAULT_WORKSPACE_GB = 4.0  # Orin Nano has 8 GB shared: a cap, not an allocation
PLAN_NAMES = {"vision": "vision.plan", "decoder": "decoder.plan"}
GRAPH_NAMES = {"vision": "vision.trt.onnx", "decoder": "decoder.trt.onnx"}

def tile_ranges(max_tiles: int, common=COMMON_TILE_COUNTS) -> list[tuple[int, int, int]]:
    """(min, opt, max) tile counts covering 1..max_tiles, one range per common count (opt = max = that count,
    so every range is tuned at its largest batch); a last range up to max_tiles when it exceeds them."""
    if max_tiles < 1:
        raise ValueError(f"max_tiles={max_tiles}: expected >= 1")
    ranges, low = [], 1
    for count in sorted(c for c in set(common) if c <= max_tiles):
        ranges.append((low, count, count))
        low = count + 1
    if low <= max_tiles:
        ranges.append((low, max_tiles, max_tiles))
    return ranges


def vision_profiles(max_tiles: int, image_size: int = 448) -> list[Profile]:
    image = (3, image_size, image_size)
    return [Profile(f"tiles{lo}-{hi}", {"pixel_values": ((lo, *image), (opt, *image), (hi, *image))})
            for lo, opt, hi in tile_ranges(max_tiles)]


def decoder_profiles(max_seq: int, hidden_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                     prefill_opt: int = PREFILL_OPT_TOKENS, kv_cache: str = DEFAULT_KV_CACHE) -> list[Profile]:
    if max_seq < 2:
        raise ValueError(f"max_seq={max_seq}: expected >= 2 (a prompt token and a generated one)")
    if kv_cache not in KV_CACHE_LAYOUTS:
        raise ValueError(f"kv_cache={kv_cache!r}: expected one of {tuple(KV_CACHE_LAYOUTS)}")
    opt = min(prefill_opt, max_seq)
    past_opt = max(1, min(max_seq - 1, max_seq // 2))

    def shapes(seq: tuple[int, int, int], past: tuple[int, int, int]):
        out = {"inputs_embeds": tuple((1, s, hidden_size) for s in seq),
               "position_ids": tuple((1, s) for s in seq)}
        for i in range(num_layers):
            for kind in ("key", "value"):
                out[f"past_key_values.{i}.{kind}"] = tuple((1, num_kv_heads, p, head_dim) for p in past)
        return out

    if kv_cache == "fixed":
        capacity = (max_seq,) * 3
        return [Profile("prefill", shapes((2, max(2, opt), max_seq), capacity)),
                Profile("decode", shapes((1, 1, 1), capacity))]
    return [Profile("prefill", shapes((1, opt, max_seq), (0, 0, 0))),
            Profile("decode", shapes((1, 1, 1), (1, past_opt, max_seq - 1)))]


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def check_tensorrt_supports(precision: str, trt_version: str, compute_capability: str) -> None:
    """Refuse, before building, a precision this TensorRT or GPU cannot build, naming what it needs."""
    recipe = build_recipe(precision)
    for graph_precision in (recipe.vision, recipe.decoder):
        if graph_precision not in GRAPH_REQUIREMENTS:
            continue
        (trt_min, cc_min, what) = GRAPH_REQUIREMENTS[graph_precision]
        if _version_tuple(trt_version) < trt_min:
            raise ValueError(f"--precision {precision}: {what} need TensorRT >= {'.'.join(map(str, trt_min))}, "
                             f"this is TensorRT {trt_version}: upgrade TensorRT (JetPack 6 ships 10.3), or build "
                             "--precision int8 (int8 weight-only decoder)")
        if _version_tuple(compute_capability) < cc_min:
            raise ValueError(f"--precision {precision}: {what} need a GPU of compute capability >= "
                             f"{'.'.join(map(str, cc_min))} (Ampere or newer), this GPU is {compute_capability}: "
                             "build --precision int8 instead")


def check_limits(manifest: Manifest, max_tiles: int | None, max_seq: int | None) -> tuple[int, int]:
    """The build's limits: the export's by default; never above them (the ONNX dims were exported bounded)."""
    limits = manifest.limits
    max_tiles = limits.max_tiles if max_tiles is None else max_tiles
    max_seq = limits.max_seq if max_seq is None else max_seq
    if not 1 <= max_tiles <= limits.max_tiles:
        raise ValueError(f"max_tiles={max_tiles}: this export takes 1..{limits.max_tiles} tiles "
                         "(re-export with a larger --max-tiles)")
    if not 2 <= max_seq <= limits.max_seq:
        raise ValueError(f"max_seq={max_seq}: this export takes 2..{limits.max_seq} positions "
                         "(re-export with a larger --max-seq)")
    return max_tiles, max_seq


def source_graphs(manifest: Manifest, precision: str,
                  kv_cache: str = DEFAULT_KV_CACHE) -> dict[str, tuple[str, bool]]:
    """kind -> (exported ONNX the engine starts from, whether build must quantize it to int8 Q/DQ first), or a
    ValueError saying which export to make instead. The decoder always starts from fp32 weights: the export's
    int8/int4 decoders are ONNX Runtime CPU graphs (contrib ops TensorRT does not parse) and the fp16 one has
    already lost the fp32 weights the build's own precision rewrite starts from. Vision int8 uses the
    export's static Q/DQ graph when it has one, else build calibrates one (export/quantize.py). kv_cache picks
    the decoder graph (see the module docstring)."""
    vision_want = build_recipe(precision).vision
    if kv_cache not in KV_CACHE_LAYOUTS:
        raise ValueError(f"kv_cache={kv_cache!r}: expected one of {tuple(KV_CACHE_LAYOUTS)}")
    have = manifest.precision
    if have.decoder != "fp32":
        raise ValueError(f"this export's decoder is {have.decoder} (an ONNX Runtime graph), which TensorRT does "
                         "not build from: export with `edgevl export --precision fp32`, then "
                         f"`edgevl build --precision {precision}` (int8 vision is calibrated during the build)")
    if vision_want == "fp16" and have.vision != "fp32":
        raise ValueError(f"--precision {precision} builds vision from fp32 weights; this export's vision is "
                         f"{have.vision}: export with --precision fp32")
    decoder = getattr(manifest.graphs, KV_CACHE_LAYOUTS[kv_cache])
    if decoder is None:
        raise ValueError(f"--kv-cache {kv_cache} builds from the export's fixed-capacity decoder graph, which this "
                         "export lacks: re-export it with this edgevl (`edgevl export --precision fp32`)")
    return {"vision": (manifest.graphs.vision, vision_want == "int8" and have.vision == "fp32"),
            "decoder": (decoder, False)}


def tensorrt_section(trt_version: str, gpu: dict, precision: str, max_tiles: int, max_seq: int,
                     profiles: dict[str, list[Profile]], build_seconds: dict[str, float],
                     kv_cache: str = DEFAULT_KV_CACHE) -> TensorRTSection:
    """The manifest's `tensorrt` section; the runtime refuses plans whose version or GPU differ from it."""
    recipe = build_recipe(precision)
    return TensorRTSection(
        version=trt_version,
        gpu=GPU(gpu["name"], gpu["compute_capability"], bool(gpu.get("integrated", False))),
        build_precision=precision,
        precision={"vision": recipe.vision, "decoder": recipe.decoder},
        strongly_typed=True,
        plans=Plans(**PLAN_NAMES),
        limits=Limits(max_tiles, max_seq),
        profiles=profiles,
        kv_cache=KV_CACHE_SECTIONS[kv_cache],
        io_dtypes={"pixel_values": "float32", "image_embeds": "float32", "inputs_embeds": "float32",
                   "position_ids": "int64", "logits": "float16"},
        build_seconds={k: round(v, 2) for k, v in build_seconds.items()},
    )
