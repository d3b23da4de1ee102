"""Precisions as recipes (ultralytics' export-formats table): what each `edgevl export --precision` and
`edgevl build --precision` makes, as one row each. The exporter, the TensorRT build, the drift gate (export and
selftest), the memory planner (`python -m benchmarks plan`) and the CLI read these tables; the graph rewrites live
in export/quantize.py (ONNX Runtime) and export/trt/precision.py (TensorRT), one weight quantizer shared by both
(export/quantizer.py). Torch-free data.

Adding a precision: a row here; a new kind of graph rewrite also needs its function in one of those two modules.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WeightScheme:
    """A decoder MatMul weight as symmetric integers (zero point 0, so -2^(bits-1) is never used) with one scale
    per output column (block_size None) or per block of block_size rows of K and column."""

    bits: int
    block_size: int | None = None

    def bytes_per_weight(self, scale_bytes: int) -> float:
        per_scale = 0.0 if self.block_size is None else scale_bytes / self.block_size  # per column: negligible
        return self.bits / 8 + per_scale


# int4 blocks of 128 along K (GPTQ/AWQ's usual group size, NVIDIA Model Optimizer's INT4 default): on the 2-core
# Xeon (AVX-512 VNNI, AMX), Qwen2-0.5B's int4 decode step at 700 past tokens took 19.7 ms against 23.8 ms with
# onnxruntime-genai's CPU default of 32, and a 662-token prefill 1.9 s against 2.5 s (fewer scales to read and
# apply). Each runtime narrows it where its kernels need (quantize.matmulnbits_block_size, trt int4_block_size).
INT4 = WeightScheme(4, block_size=128)
INT8 = WeightScheme(8)

# Drift floors (edgevl.drift's figures) against the fp32 export (export) or the PyTorch fp32 reference (build),
# checked by `edgevl selftest` and the tests on the tiny random models, whose 64-wide layers make quantization noise
# relatively larger than on the real 896-3072-wide ones; an export records its drift in its manifest.
# Greedy-token agreement is recorded but not gated: random weights leave near-ties between logits, so one flipped
# argmax early in an answer (seen at 0.375 with a next-token cosine of 0.9998) says little about the quantizer.
_FP16_BOUNDS = {"image_embeds_cosine_min": 0.999, "next_token_logits_cosine_min": 0.999,
                "next_token_top1_agreement": 0.75}


@dataclass(frozen=True)
class Recipe:
    vision: str  # the vision graph's precision (the manifest's precision.vision, or TensorRT's graph precision)
    decoder: str  # the decoder graph's
    decoder_weights: WeightScheme | None  # None: fp32 / fp16 weights
    kv_layout: str | None  # exports: the decoder's KV layout (edgevl.manifest); builds: --kv-cache decides
    drift_bounds: dict[str, float] | None  # floors `edgevl selftest` checks; None: not checked
    summary: str  # for --help


# `edgevl export --precision`: graphs ONNX Runtime runs (fp32 is also what `edgevl build` starts from).
EXPORT_PRECISIONS: dict[str, Recipe] = {
    "fp32": Recipe("fp32", "fp32", None, "concat", None,
                   "standard ops: the reference, and the input of `edgevl build`"),
    "fp16": Recipe("fp16", "fp16", None, "concat", _FP16_BOUNDS,
                   "fp16 graphs with fp32 normalisations, for ONNX Runtime on CUDA"),
    "int8": Recipe("int8", "int8", INT8, "shared",
                   {"image_embeds_cosine_min": 0.99, "next_token_logits_cosine_min": 0.995,
                    "next_token_top1_agreement": 0.75},
                   "int8 vision (calibrated) + a CPU decoder with int8 weights and per-token int8 activations "
                   "(fastest prefill)"),
    # int4's next-token argmax flips on 1 of the 4 prompts for two of the tiny models (near-tied logits).
    "int4": Recipe("int8", "int4", INT4, "shared",
                   {"image_embeds_cosine_min": 0.99, "next_token_logits_cosine_min": 0.95,
                    "next_token_top1_agreement": 0.5},
                   f"int8 vision + a CPU decoder with int4 weights in blocks of {INT4.block_size} (fastest decode, "
                   "least memory)"),
}

# `edgevl build --precision`: TensorRT plans from an fp32 export. Graph precisions are TensorRT's (export/trt).
BUILD_PRECISIONS: dict[str, Recipe] = {
    # fp16 InternViT is the known overflow trap: gated tightly.
    "fp16": Recipe("fp16", "fp16", None, None, _FP16_BOUNDS, "both engines fp16 (norms, softmax, residual adds fp32)"),
    "int8": Recipe("int8", "int8-weight-only", INT8, None, None, "int8 Q/DQ vision + weight-only int8 decoder"),
    "int8-vision-fp16-llm": Recipe("int8", "fp16", None, None,
                                   {"image_embeds_cosine_min": 0.98, "next_token_logits_cosine_min": 0.999},
                                   "int8 vision + fp16 decoder"),
    "int4-llm": Recipe("fp16", "int4-weight-only", INT4, None, None,
                       f"fp16 vision + weight-only int4 decoder (blocks of {INT4.block_size}; TensorRT >= 10.0, "
                       "Ampere or newer)"),
    "int8-vision-int4-llm": Recipe("int8", "int4-weight-only", INT4, None, None, "int8 vision + int4 decoder"),
}


def export_recipe(name: str) -> Recipe:
    if name not in EXPORT_PRECISIONS:
        raise ValueError(f"precision={name!r}: expected one of {tuple(EXPORT_PRECISIONS)}")
    return EXPORT_PRECISIONS[name]


def build_recipe(name: str) -> Recipe:
    if name not in BUILD_PRECISIONS:
        raise ValueError(f"precision={name!r}: expected one of {tuple(BUILD_PRECISIONS)}")
    return BUILD_PRECISIONS[name]


def precision_help(table: dict[str, Recipe]) -> str:
    return "; ".join(f"{name}: {recipe.summary}" for name, recipe in table.items())
