"""Memory arithmetic: bytes of weights a decode step reads (the roofline's denominator) and the memory planner
(`python -m benchmarks plan`): weights + KV cache + activations against a device's memory.

Estimates, not measurements: every term is a formula of the model's shape written out below, so a reader can
check it. Activation terms assume attention scores are materialised (no fused attention), the upper bound.
"""
from __future__ import annotations

from dataclasses import dataclass

from edgevl.export.exporter import export_disk_bytes
from edgevl.manifest import EXTERNAL_DATA_BYTES
from edgevl.precisions import EXPORT_PRECISIONS
from edgevl.specs import ModelSpec

GIB = 1 << 30


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int
    bandwidth_bytes_per_s: float | None  # vendor figure (LPDDR5 / GDDR6X); None: measure it (`run`)
    reserved_bytes: int  # what the OS, CUDA context and runtime keep before the model loads (assumption)
    unified: bool  # CPU and GPU share the memory (Jetson) or it is the CPU's RAM


DEVICES: dict[str, Device] = {
    # Jetson: LPDDR5 shared with the OS (~1 GB with a desktop-less image) and the CUDA/TensorRT context (~0.6 GB).
    "orin-nano-8gb": Device("Jetson Orin Nano 8GB", 8 * GIB, 68e9, int(1.6 * GIB), True),
    "orin-nx-16gb": Device("Jetson Orin NX 16GB", 16 * GIB, 102.4e9, int(1.6 * GIB), True),
    "agx-orin-32gb": Device("Jetson AGX Orin 32GB", 32 * GIB, 204.8e9, int(1.6 * GIB), True),
    "agx-orin-64gb": Device("Jetson AGX Orin 64GB", 64 * GIB, 204.8e9, int(1.6 * GIB), True),
    # Discrete: only the CUDA context (~0.6 GB) comes off the card's 24 GB.
    "rtx-4090": Device("GeForce RTX 4090 24GB", 24 * GIB, 1008e9, int(0.6 * GIB), False),
}
PRECISIONS = tuple(EXPORT_PRECISIONS)
_GRAPH_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0}


def _bytes_per_weight(precision: str) -> tuple[float, float]:
    """(vision, decoder matrix) bytes per weight of an export (edgevl.precisions): quantized decoder weights with
    their fp32 scales (per output channel for int8: negligible per weight)."""
    recipe = EXPORT_PRECISIONS[precision]
    weights = recipe.decoder_weights
    return _GRAPH_BYTES[recipe.vision], (weights.bytes_per_weight(4) if weights else _GRAPH_BYTES[recipe.decoder])


def cpu_device(ram_bytes: int) -> Device:
    """This kind of box: its RAM, the OS and Python runtime (~1.5 GB) reserved, bandwidth measured by `run`."""
    return Device(f"CPU box {ram_bytes / GIB:.0f} GB RAM", ram_bytes, None, int(1.5 * GIB), True)


def parameter_counts(spec: ModelSpec) -> dict[str, int]:
    """Parameters of the vision tower + projector, the decoder's matrices, its vectors (norms, biases), the token
    embedding and the lm_head, from the same shape table the loaders check against."""
    from edgevl.weights import expected_shapes

    counts = {"vision": 0, "decoder_matrices": 0, "decoder_vectors": 0, "embedding": 0, "lm_head": 0}
    for name, shape in expected_shapes(spec).items():
        n = 1
        for s in shape:
            n *= s
        if name == "decoder.embed.weight":
            counts["embedding"] += n
        elif name == "decoder.lm_head.weight":
            counts["lm_head"] += n
        elif name.startswith("decoder."):
            counts["decoder_matrices" if len(shape) == 2 else "decoder_vectors"] += n
        else:
            counts["vision"] += n
    return counts


# `edgevl export`'s peak RSS, stage by stage as export/exporter.py runs them: each torch export in a process of
# its own holding one fp32 module (vision tower + projector, then the decoder with its embedding and lm_head), the
# quantizers and the drift check in the exporting process, which meanwhile holds only its own floor. Coefficients
# measured on the InternVL2-1B, -2B and -4B shapes (AMD EPYC Zen 4, 2 cores, AVX-512 VNNI; onnxruntime 1.32, torch
# 2.13): see benchmarks/RESULTS.md ("`edgevl export` memory").
EXPORT_FLOOR_BYTES = int(0.3 * GIB)  # Python with numpy, onnx, onnxruntime and torch imported, per process
TORCH_EXPORT_OVERHEAD_BYTES = int(0.75 * GIB)  # torch.onnx.export beyond the fp32 decoder weights it exports
# InternViT-300M + projector, the same in every InternVL2 size: its torch export process, and calibration +
# quantize_static in the exporting process.
VISION_EXPORT_BYTES, VISION_INT8_BYTES = int(2.4 * GIB), int(2.7 * GIB)
ORT_FP32_FACTOR = 1.065  # the drift check's fp32 reference in ONNX Runtime, per byte of fp32 weights
# The drift check's longest generation: a 3-tile image, a prompt and a 32-token answer. Its fp32 reference decodes
# in the concat layout, holding past and present (2x this cache) during a step: 1.2 GiB for the 4B (Phi-3, no GQA).
DRIFT_CHECK_POSITIONS = 850


def export_memory(spec: ModelSpec, precision: str) -> dict[str, int]:
    """Peak RSS of `edgevl export --precision precision` for `spec`, per stage and in all ("peak"). Assumes the
    coefficients above: a torch export holds its fp32 weights and a fixed overhead, the drift check's fp32
    reference as large as its weights plus its KV cache (its candidate is smaller and loaded after it), quantized
    decoder weights held whole only when the graph embeds them (under EXTERNAL_DATA_BYTES), else one weight at a
    time."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    counts = parameter_counts(spec)
    vision = counts["vision"] * 4
    decoder = (counts["decoder_matrices"] + counts["decoder_vectors"] + counts["embedding"] + counts["lm_head"]) * 4
    floor = EXPORT_FLOOR_BYTES
    # A torch export process's peak comes on top of the exporting process's floor, which waits for it.
    stages = {"vision.onnx (torch export process)": floor + VISION_EXPORT_BYTES,
              "decoder.onnx (torch export process)": floor + floor + decoder + TORCH_EXPORT_OVERHEAD_BYTES}
    if precision != "fp32":
        if precision == "fp16":  # export/trt/precision.py loads each fp32 graph whole and converts it (not measured)
            stages["fp16 graphs"] = floor + int(1.5 * max(vision, decoder))
        else:
            quantized = decoder * _bytes_per_weight(precision)[1] / 4
            stages["vision int8"] = VISION_INT8_BYTES
            # Embedded: the whole quantized graph; else the largest weight (the lm_head) and ~4 temporaries of it.
            stages[f"decoder {precision}"] = floor + int(quantized if quantized <= EXTERNAL_DATA_BYTES else
                                                         counts["lm_head"] * 4 * 5)
        stages["drift check (fp32 reference in ONNX Runtime)"] = (floor + int(ORT_FP32_FACTOR * (vision + decoder))
                                                                  + 2 * kv_cache_bytes(spec, DRIFT_CHECK_POSITIONS, 4))
    return {**stages, "peak": max(stages.values())}


def decode_bytes_per_token(spec: ModelSpec, precision: str) -> int:
    """Weights one decode step reads: every decoder matrix and the lm_head once (the embedding: one row)."""
    counts = parameter_counts(spec)
    matrix_bytes = _bytes_per_weight(precision)[1]
    return int((counts["decoder_matrices"] + counts["lm_head"]) * matrix_bytes + counts["decoder_vectors"] * 4
               + spec.decoder.hidden_size * 4)


def kv_cache_bytes(spec: ModelSpec, seq: int, kv_dtype_bytes: int) -> int:
    d = spec.decoder
    return 2 * d.num_layers * d.num_kv_heads * d.head_dim * seq * kv_dtype_bytes


def activation_bytes(spec: ModelSpec, tiles: int, prefill_tokens: int, dtype_bytes: int) -> dict[str, int]:
    """Peak transient memory of one vision layer over `tiles` tiles and of one decoder layer over a prefill of
    `prefill_tokens` (attention scores materialised, hidden states in and out, the MLP's widest tensor)."""
    v, d = spec.vision, spec.decoder
    tokens = v.num_patches + 1
    vision = tiles * dtype_bytes * (v.num_heads * tokens * tokens + tokens * (3 * v.hidden_size + v.intermediate_size
                                                                              + 2 * v.hidden_size))
    prefill = dtype_bytes * (d.num_heads * prefill_tokens ** 2 + prefill_tokens * (2 * d.intermediate_size
                                                                                   + 4 * d.hidden_size))
    return {"vision": vision, "prefill": prefill + d.vocab_size * 4}


def _terms(spec: ModelSpec, device: Device, precision: str, max_seq: int, tiles: int) -> dict[str, int]:
    gpu = device.bandwidth_bytes_per_s is not None  # the Jetsons and the 4090 run TensorRT (fp16 KV, fp16 act.)
    act_bytes = 2 if gpu and precision != "fp32" else 4
    counts = parameter_counts(spec)
    return {
        "weights: vision + projector": int(counts["vision"] * _bytes_per_weight(precision)[0]),
        "weights: decoder + lm_head": decode_bytes_per_token(spec, precision),
        # edgevl exports keep the table fp32 and mmap it: only rows used become resident; counted whole.
        "weights: token embedding": counts["embedding"] * act_bytes,
        # The concat KV layout holds past and present during a step: 2x one cache at max_seq.
        "KV cache (x2: concat layout)": 2 * kv_cache_bytes(spec, max_seq, act_bytes),
        "activations (max of vision, prefill)": max(activation_bytes(spec, tiles, max_seq, act_bytes).values()),
        "reserved (OS, runtime, CUDA context)": device.reserved_bytes,
    }


def plan(spec: ModelSpec, device: Device, precision: str, max_seq: int, tiles: int = 13) -> dict:
    """Each term in bytes, the total, and whether it fits in the device's memory after its reserve."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    terms = _terms(spec, device, precision, max_seq, tiles)
    total = sum(terms.values())
    bytes_per_token = decode_bytes_per_token(spec, precision)
    ceiling = device.bandwidth_bytes_per_s / bytes_per_token if device.bandwidth_bytes_per_s else None
    return {"device": device.name, "memory_bytes": device.memory_bytes, "precision": precision, "max_seq": max_seq,
            "tiles": tiles, "terms": terms, "total_bytes": total, "fits": total <= device.memory_bytes,
            "headroom_bytes": device.memory_bytes - total, "decode_bytes_per_token": bytes_per_token,
            "decode_ceiling_tokens_per_s": ceiling, "largest_max_seq": _largest_max_seq(spec, device, precision, tiles),
            "export_peak_bytes": {p: export_memory(spec, p)["peak"] for p in PRECISIONS},
            "export_disk_bytes": {p: export_disk_bytes(4 * sum(parameter_counts(spec).values()), p)
                                  for p in PRECISIONS}}


def _largest_max_seq(spec, device, precision, tiles) -> int:
    """The longest max_seq (a multiple of 256, up to the model's context) that still fits; 0 if none does."""
    fits = lambda seq: sum(_terms(spec, device, precision, seq, tiles).values()) <= device.memory_bytes  # noqa: E731
    lo, hi = 0, spec.decoder.max_position_embeddings // 256  # in units of 256; fits(lo * 256) holds or lo == 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid * 256) else (lo, mid - 1)
    return lo * 256


def format_plan(result: dict) -> str:
    lines = [f"Memory plan: {result['device']} ({_gib(result['memory_bytes'])}), {result['precision']}, "
             f"max_seq {result['max_seq']}, {result['tiles']} tiles", "",
             "| term | GiB |", "|---|---:|"]
    lines += [f"| {name} | {b / GIB:.2f} |" for name, b in result["terms"].items()]
    lines += [f"| **total** | **{result['total_bytes'] / GIB:.2f}** |", ""]
    if result["fits"]:
        lines.append(f"FITS: {_gib(result['headroom_bytes'])} left of {_gib(result['memory_bytes'])}.")
    else:
        lines.append(f"DOES NOT FIT: {_gib(-result['headroom_bytes'])} over {_gib(result['memory_bytes'])}; "
                     "lower --max-seq, fewer tiles, or a smaller precision.")
    lines.append(f"Largest max_seq that fits at this precision and tile count: {result['largest_max_seq'] or 'none'}.")
    if result["decode_ceiling_tokens_per_s"]:
        lines.append(f"Decode ceiling from the vendor bandwidth: {result['decode_ceiling_tokens_per_s']:.0f} tokens/s "
                     f"({result['decode_bytes_per_token'] / 1e6:.0f} MB of weights read per token).")
    lines.append("Exporting (`edgevl export`, on the machine that exports) needs a peak RSS of "
                 + ", ".join(f"{p} {b / GIB:.1f} GiB" for p, b in result["export_peak_bytes"].items())
                 + " (plan.export_memory: the largest stage, from the fp32 weights), and free disk of "
                 + ", ".join(f"{p} {b / 1e9:.1f} GB" for p, b in result["export_disk_bytes"].items())
                 + " beside --out (the export checks it before it starts).")
    lines.append("Estimates: attention scores counted as materialised; the token embedding counted whole.")
    return "\n".join(lines)


def _gib(b: int) -> str:
    return f"{b / GIB:.2f} GiB"
