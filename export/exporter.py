"""`edgevl export`: a checkpoint directory -> an exported directory that ONNX Runtime runs and `edgevl build`
compiles into TensorRT plans.

OUT/
  vision.onnx        pixel_values [tiles, 3, 448, 448] -> image_embeds [tiles, 256, H]
  decoder.onnx       inputs_embeds + position_ids + past KV -> logits (last position) + present KV
  decoder_fixed.onnx the same decoder over a fixed-capacity KV cache, for TensorRT (`edgevl build --kv-cache fixed`);
                     shares decoder.onnx's weights (its external data file when it has one)
  embed_tokens.npy   the token embedding table (a gather on the host is cheaper than a graph call)
  tokenizer files    copied from the checkpoint
  manifest.json      the contract: spec, token ids, precisions, limits, KV layout, versions, checksums, drift
"""
from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edgevl import __version__
from edgevl.drift import format_drift
from edgevl.errors import SettingError
from edgevl.manifest import MANIFEST_NAME, is_export_dir, read_manifest, write_manifest
from edgevl.prompts import IMG_CONTEXT, IMG_END, IMG_START, checkpoint_system_message
from edgevl.specs import spec_to_dict

# --precision -> (vision, decoder)
PRECISIONS = {"fp32": ("fp32", "fp32"), "fp16": ("fp16", "fp16"), "int8": ("int8", "int8"), "int4": ("int8", "int4")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt")
DEFAULT_MAX_TILES = 13  # 12 + thumbnail
DEFAULT_MAX_SEQ = 4096
FIXED_KV_CACHE = {"layout": "fixed", "dtype": "float32",
                  "inputs": "past_key_values.{layer}.{key|value} [1, kv_heads, capacity, head_dim]",
                  "outputs": "present.{layer}.{key|value} [1, kv_heads, capacity, head_dim]: past with the step's "
                             "rows written at position_ids",
                  "capacity": "2..max_seq, fixed per TensorRT plan; cached rows at and after the step's first "
                              "position are masked, so they must hold finite values (zero-initialise)"}

# The CPU decoders whose attention is ONNX Runtime's GroupQueryAttention (export/cpu_graph.py): past and present
# are one buffer, written in place, so a step copies nothing and attends over the valid rows only.
SHARED_KV_CACHE = {"layout": "shared", "dtype": "float32",
                   "inputs": "past_key_values.{layer}.{key|value} [1, kv_heads, capacity, head_dim]",
                   "outputs": "present.{layer}.{key|value}: bound to the same buffer as past; the step's rows are "
                              "written at position_ids, whose last value + 1 is the valid length",
                   "capacity": "the runtime's max_seq (<= limits.max_seq)"}


@contextmanager
def _stage(log, name: str):
    log(f"[export] {name} ...")
    start = time.perf_counter()
    yield
    log(f"[export] {name} done in {time.perf_counter() - start:.1f} s")


def export_model(model_dir, out_dir, precision: str = "fp32", max_tiles: int = DEFAULT_MAX_TILES,
                 max_seq: int = DEFAULT_MAX_SEQ, calib_images=None, log=print) -> Path:
    """Export `model_dir` to `out_dir`; returns the manifest path. fp16/int8/int4 also measure drift against fp32.

    A transaction: every argument and the checkpoint are checked before out_dir is touched, the export is written
    into a directory beside it and swapped in only once complete (manifest last, drift checks passed), so a failed
    or killed export leaves an earlier export in out_dir as it was. out_dir must be new, empty or an earlier
    export: any other directory is refused, never deleted."""
    from edgevl.checkpoint import load_checkpoint

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if precision not in PRECISIONS:
        raise SettingError("", "precision", precision, f"expected one of {tuple(PRECISIONS)}")
    if not isinstance(max_tiles, int) or not 1 <= max_tiles <= 64:
        raise SettingError("", "max_tiles", max_tiles, "expected 1..64 (13 = 12 tiles + thumbnail; ~40 for video)")
    if calib_images is not None and precision not in ("int8", "int4"):
        raise SettingError("", "calib_images", str(calib_images), f"calibrates int8 vision graphs, and precision "
                           f"{precision!r} has none")
    check_destination(out_dir, source=model_dir)
    checkpoint = load_checkpoint(model_dir)  # weights are memory-mapped: this reads headers and shapes
    limit = checkpoint.spec.decoder.max_position_embeddings
    if not isinstance(max_seq, int) or not 1 <= max_seq <= limit:
        raise SettingError("", "max_seq", max_seq, f"expected 1..{limit} (the model's context)")
    if calib_images is not None:
        from .quantize import calibration_images

        calibration_images(calib_images)
    with staged(out_dir) as work:
        if precision == "fp32":
            _export_fp32(model_dir, checkpoint, work, max_tiles, max_seq, log)
        else:
            with tempfile.TemporaryDirectory(prefix=f"{work.name}-fp32-", dir=work.parent) as fp32_dir:
                _export_fp32(model_dir, checkpoint, Path(fp32_dir), max_tiles, max_seq, log,
                             fixed_cache_graph=False)
                _quantize_into(Path(fp32_dir), work, precision, calib_images, log)
    return out_dir / MANIFEST_NAME


def check_destination(out_dir: Path, source: Path | None = None) -> None:
    """Refuse an output directory that an export may not replace: a file, a non-empty directory that is not an
    edgevl export, or one that is or holds the source."""
    if source is not None:
        src, out = source.resolve(), out_dir.resolve()
        if out == src or src.is_relative_to(out) or out.is_relative_to(src):
            raise ValueError(f"--out {out_dir} and --model {source} overlap: write the export elsewhere")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: is a file; the export needs a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_export_dir(out_dir):
        raise ValueError(f"{out_dir}: exists, is not empty and is not an edgevl export; refusing to replace it "
                         "(choose a new or empty directory)")


@contextmanager
def staged(out_dir: Path):
    """Yield a fresh directory beside out_dir (same filesystem) to write an export into; when the block succeeds it
    replaces out_dir (an atomic exchange where the kernel offers one), when it fails it is removed. Directories
    left by killed exports (`.NAME.partial-*`) are removed first."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield work
        if not (work / MANIFEST_NAME).is_file():
            raise RuntimeError(f"{work}: the export wrote no {MANIFEST_NAME}")
        if out_dir.exists():
            _exchange(work, out_dir)  # work now holds the previous export, removed below
        else:
            os.rename(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _exchange(a: Path, b: Path) -> None:
    """Swap two directories: renameat2(RENAME_EXCHANGE) is atomic (Linux, glibc >= 2.28); elsewhere two renames,
    with b missing for an instant in between."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        renameat2 = None
    at_fdcwd, rename_exchange = -100, 2
    if renameat2 is not None and renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return
    aside = a.with_name(a.name + "-previous")
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


def _export_fp32(model_dir: Path, checkpoint, out_dir: Path, max_tiles: int, max_seq: int, log,
                 fixed_cache_graph: bool = True) -> None:
    """fixed_cache_graph: also write decoder_fixed.onnx (TensorRT only builds from fp32 exports, so the temporary
    fp32 export behind a quantized one skips it)."""
    from edgevl.backends.torch_backend import TorchBackend
    from edgevl.tokenizer import load_tokenizer

    from .graphs import OPSET, export_decoder, export_decoder_fixed_cache, export_vision

    with _stage(log, f"load checkpoint {model_dir}"):
        tokenizer = load_tokenizer(model_dir)
        model = TorchBackend(checkpoint, dtype="float32")
    spec = checkpoint.spec
    with _stage(log, f"vision.onnx (tiles 1..{max_tiles})"):
        export_vision(model.vision, out_dir / "vision.onnx", max_tiles)
    with _stage(log, f"decoder.onnx (max_seq {max_seq}, {spec.decoder.num_layers} layers)"):
        export_decoder(model.lm, out_dir / "decoder.onnx", max_seq)
    if fixed_cache_graph:
        with _stage(log, "decoder_fixed.onnx (fixed-capacity KV cache, for TensorRT)"):
            export_decoder_fixed_cache(model.lm, out_dir / "decoder_fixed.onnx", max_seq,
                                       weights_from=out_dir / "decoder.onnx")
    np.save(out_dir / "embed_tokens.npy", model.lm.embed.weight.detach().float().numpy())
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
    template = spec.template
    manifest = {
        "edgevl_version": __version__,
        "source": {"path": str(model_dir), "format": checkpoint.format, "dtype": checkpoint.dtype},
        "spec": spec_to_dict(spec),
        "template": template,
        "system_message": checkpoint_system_message(model_dir, template),
        "tokens": {name: tokenizer.token_to_id(tok) for name, tok in
                   (("img_start", IMG_START), ("img_end", IMG_END), ("img_context", IMG_CONTEXT))},
        "precision": {"vision": "fp32", "decoder": "fp32"},
        "limits": {"max_tiles": max_tiles, "max_seq": max_seq},
        "graphs": {"vision": "vision.onnx", "decoder": "decoder.onnx", "embed_tokens": "embed_tokens.npy",
                   **({"decoder_fixed": "decoder_fixed.onnx"} if fixed_cache_graph else {})},
        "kv_cache": {"layout": "concat", "dtype": "float32",
                     "inputs": "past_key_values.{layer}.{key|value} [1, kv_heads, past, head_dim]",
                     "outputs": "present.{layer}.{key|value} [1, kv_heads, past + seq, head_dim]",
                     **({"decoder_fixed": FIXED_KV_CACHE} if fixed_cache_graph else {})},
        "opset": OPSET,
        "versions": _versions(),
    }
    write_manifest(out_dir, manifest)


def quantize_export(fp32_dir, out_dir, precision: str, calib_images=None, log=print) -> Path:
    """An fp32 export -> a lower-precision copy in out_dir (fp16: fp16 graphs with fp32 islands, for ONNX Runtime
    on CUDA; int8: int8 vision + int8 decoder weights; int4: int8 vision + int4 decoder weights), with its drift
    against the fp32 export recorded in the manifest. A transaction like export_model."""
    if precision not in PRECISIONS or precision == "fp32":
        raise ValueError(f"precision={precision!r}: expected one of {tuple(PRECISIONS)[1:]}")
    fp32_dir, out_dir = Path(fp32_dir), Path(out_dir)
    read_manifest(fp32_dir, verify_checksums=False)
    check_destination(out_dir, source=fp32_dir)
    with staged(out_dir) as work:
        _quantize_into(fp32_dir, work, precision, calib_images, log)
    return out_dir / MANIFEST_NAME


def _quantize_into(reference_dir: Path, out_dir: Path, precision: str, calib_images, log) -> None:
    from edgevl import EdgeVL
    from edgevl.cpu import describe as describe_cpu
    from edgevl.drift import measure_drift
    from edgevl.specs import spec_from_dict

    from .quantize import calibration_tiles, quantize_decoder_weights, quantize_vision_int8

    vision, decoder = PRECISIONS[precision]
    manifest = read_manifest(reference_dir, verify_checksums=False)
    spec = spec_from_dict(manifest["spec"])
    # Everything but the fp32 graphs (and their external weights), which the quantized ones replace.
    shutil.copytree(reference_dir, out_dir, ignore=shutil.ignore_patterns("*.onnx", "*.onnx.data"),
                    dirs_exist_ok=True)
    # TensorRT's fixed-cache decoder is built from fp32 exports only; the copy does not carry it.
    manifest["graphs"].pop("decoder_fixed", None)
    manifest["kv_cache"].pop("decoder_fixed", None)
    if precision == "fp16":
        from .trt.precision import write_precision_graph

        for kind in ("vision", "decoder"):
            with _stage(log, f"{kind} fp16 (normalisations, softmax and residual adds fp32)"):
                write_precision_graph(reference_dir / f"{kind}.onnx", out_dir / f"{kind}.onnx", kind, "fp16")
        manifest["kv_cache"]["dtype"] = "float16"
        quantization = {kind: "fp16 weights and activations; normalisations, softmax and residual adds fp32"
                        for kind in ("vision", "decoder")}
    else:
        with _stage(log, f"vision int8 (static Q/DQ, calibrated on {calib_images or 'generated images'})"):
            quantize_vision_int8(reference_dir / "vision.onnx", out_dir / "vision.onnx",
                                 calibration_tiles(calib_images, spec.tiling))
        with _stage(log, f"decoder {decoder}"):
            scheme, fused_attention = quantize_decoder_weights(
                reference_dir / "decoder.onnx", out_dir / "decoder.onnx", {"int8": 8, "int4": 4}[decoder],
                manifest["spec"]["decoder"], manifest["limits"]["max_seq"])
        log(f"[export] decoder: {scheme}" + (", attention fused (GroupQueryAttention)" if fused_attention else ""))
        if fused_attention:
            manifest["kv_cache"] = SHARED_KV_CACHE
        quantization = {"vision": "static int8 Q/DQ, symmetric; attention and normalisations fp32", "decoder": scheme}
    manifest["precision"] = {"vision": vision, "decoder": decoder}
    manifest["quantization"] = quantization
    manifest.pop("files")
    write_manifest(out_dir, manifest)
    with _stage(log, "drift against fp32"):
        drift = measure_drift(EdgeVL.from_pretrained(reference_dir), EdgeVL.from_pretrained(out_dir))
    log("[export] drift vs fp32: " + format_drift(drift))
    # The CPU it was measured on: integer kernels differ between ISA classes (edgevl.cpu).
    write_manifest(out_dir, {**manifest, "drift_vs_fp32": {**drift, "measured_on": describe_cpu()}})


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    return {"edgevl": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}
