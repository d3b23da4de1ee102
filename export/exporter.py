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
int8 / int4 exports also carry, for x86 CPUs (edgevl.cpu says which run them):
  decoder_avx2.onnx  the decoder on edgevl's Int8MatMul / Int4MatMul and GroupQueryAttention (decoder.onnx.data)
  vision_amx.onnx    the vision graph with edgevl's MultiHeadAttention, bf16 on AMX tiles (vision.onnx.data)
"""
from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from edgevl import __version__
from edgevl.drift import format_drift
from edgevl.errors import SettingError
from edgevl.manifest import (CONCAT_KV, FIXED_KV, MANIFEST_NAME, SHARED_KV, ExportError, Graphs, ImageTokens, Limits,
                             Manifest, Precision, Source, is_export_dir, read_manifest, write_manifest)
from edgevl.precisions import EXPORT_PRECISIONS
from edgevl.prompts import IMG_CONTEXT, IMG_END, IMG_START, checkpoint_system_message

from .memory import GIB, export_peak_rss_bytes, release_memory, stage_processes

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt")
DEFAULT_MAX_TILES = 13  # 12 + thumbnail
DEFAULT_MAX_SEQ = 4096
@contextmanager
def _stage(log, name: str):
    """Log a stage's start and end; the end line gives the export's peak RSS so far (with its torch export
    processes: memory.export_peak_rss_bytes). Memory the stage freed is handed back before the next one starts."""
    log(f"[export] {name} ...")
    start = time.perf_counter()
    yield
    release_memory()
    peak = export_peak_rss_bytes()
    log(f"[export] {name} done in {time.perf_counter() - start:.1f} s"
        + (f", peak RSS so far {peak / GIB:.1f} GiB" if peak else ""))


def export_model(model_dir, out_dir, precision: str = "fp32", max_tiles: int = DEFAULT_MAX_TILES,
                 max_seq: int = DEFAULT_MAX_SEQ, calib_images=None, log=print) -> Path:
    """Export `model_dir` to `out_dir`; returns the manifest path. fp16/int8/int4 also measure drift against fp32.

    A transaction: every argument and the checkpoint are checked before out_dir is touched, the export is written
    into a directory beside it and swapped in only once complete (manifest last, drift checks passed), so a failed
    or killed export leaves an earlier export in out_dir as it was. out_dir must be new, empty or an earlier
    export: any other directory is refused, never deleted."""
    from edgevl.checkpoint import load_checkpoint

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if precision not in EXPORT_PRECISIONS:
        raise SettingError("", "precision", precision, f"expected one of {tuple(EXPORT_PRECISIONS)}")
    if not isinstance(max_tiles, int) or not 1 <= max_tiles <= 64:
        raise SettingError("", "max_tiles", max_tiles, "expected 1..64 (13 = 12 tiles + thumbnail; ~40 for video)")
    if calib_images is not None and EXPORT_PRECISIONS[precision].vision != "int8":
        raise SettingError("", "calib_images", str(calib_images), f"calibrates int8 vision graphs, and precision "
                           f"{precision!r} has none")
    check_destination(out_dir, source=model_dir)
    checkpoint = load_checkpoint(model_dir)  # weights are memory-mapped: this reads headers and shapes
    check_free_space(out_dir, checkpoint, precision)
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


def export_disk_bytes(fp32_weight_bytes: int, precision: str) -> int:
    """Disk an export of `precision` holds at its largest: fp32 every weight once (TensorRT's fixed-cache graph
    reads decoder.onnx's data file) and a tenth for the graphs and files beside them; the other precisions an fp32
    export without that graph in a temporary directory beside the output, plus the output itself (at most half of
    it, fp16's)."""
    return 11 * fp32_weight_bytes // 10 if precision == "fp32" else 3 * fp32_weight_bytes // 2


def check_free_space(out_dir: Path, checkpoint, precision: str) -> None:
    """Refuse, before anything is written, an export the output's disk cannot hold at its largest."""
    fp32_bytes = 4 * sum(checkpoint.weights.elements(name) for name in checkpoint.weights)
    need = export_disk_bytes(fp32_bytes, precision)
    where = next(p for p in (out_dir, *out_dir.resolve().parents) if p.exists())
    free = shutil.disk_usage(where).free
    if free < need:
        raise OSError(f"{where}: {free / 1e9:.1f} GB free; a {precision} export of {checkpoint.path} needs about "
                      f"{need / 1e9:.1f} GB there while it runs ({fp32_bytes / 1e9:.1f} GB of fp32 weights): free "
                      "some space or choose another --out")


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
    fp32 export behind a quantized one skips it). Each torch export runs in a process of its own, holding one
    fp32 torch module: the vision tower's, then the decoder's. torch.onnx.export keeps the tensors it exported
    from alive after it returns, outside Python's reach (neither deleting the module nor emptying its parameters
    frees them): run here, an export would carry the whole fp32 model into every later stage."""
    from edgevl.tokenizer import load_tokenizer

    from . import graphs

    tokenizer = load_tokenizer(model_dir)
    spec = checkpoint.spec
    with stage_processes() as run:
        with _stage(log, f"vision.onnx (tiles 1..{max_tiles})"):
            run(_export_vision_graph, model_dir, out_dir, max_tiles, graphs.EXTERNAL_DATA_BYTES)
        decoders = ("decoder.onnx and decoder_fixed.onnx (TensorRT's fixed KV cache)" if fixed_cache_graph
                    else "decoder.onnx")
        with _stage(log, f"{decoders} (max_seq {max_seq}, {spec.decoder.num_layers} layers)"):
            run(_export_decoder_graphs, model_dir, out_dir, max_seq, fixed_cache_graph, graphs.EXTERNAL_DATA_BYTES)
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
    manifest = Manifest(
        edgevl_version=__version__,
        source=Source(str(model_dir), checkpoint.format, checkpoint.dtype),
        spec=spec,
        template=spec.template,
        system_message=checkpoint_system_message(model_dir, spec.template),
        tokens=ImageTokens(*(tokenizer.token_to_id(tok) for tok in (IMG_START, IMG_END, IMG_CONTEXT))),
        precision=Precision("fp32", "fp32"),
        limits=Limits(max_tiles, max_seq),
        graphs=Graphs("vision.onnx", "decoder.onnx", "embed_tokens.npy",
                      decoder_fixed="decoder_fixed.onnx" if fixed_cache_graph else None),
        kv_cache=replace(CONCAT_KV, decoder_fixed=FIXED_KV if fixed_cache_graph else None),
        opset=graphs.OPSET,
        versions=_versions(),
    )
    write_manifest(out_dir, manifest)


def _export_vision_graph(model_dir: Path, out_dir: Path, max_tiles: int, external_data_bytes: int) -> None:
    """In a stage process (memory.stage_processes); external_data_bytes: the exporting process's
    graphs.EXTERNAL_DATA_BYTES (a stage process has the module as imported, not as the exporting process set it)."""
    import torch

    from edgevl.backends.torch_backend import load_vision
    from edgevl.checkpoint import load_checkpoint

    from . import graphs

    graphs.EXTERNAL_DATA_BYTES = external_data_bytes
    graphs.export_vision(load_vision(load_checkpoint(model_dir), torch.float32), out_dir / "vision.onnx", max_tiles)


def _export_decoder_graphs(model_dir: Path, out_dir: Path, max_seq: int, fixed_cache_graph: bool,
                           external_data_bytes: int) -> None:
    """decoder.onnx, optionally decoder_fixed.onnx (sharing its external weights), and embed_tokens.npy; in a
    stage process, external_data_bytes as for _export_vision_graph."""
    import torch

    from edgevl.backends.torch_backend import load_language_model
    from edgevl.checkpoint import load_checkpoint

    from . import graphs

    graphs.EXTERNAL_DATA_BYTES = external_data_bytes
    lm = load_language_model(load_checkpoint(model_dir), torch.float32)
    graphs.export_decoder(lm, out_dir / "decoder.onnx", max_seq)
    if fixed_cache_graph:
        graphs.export_decoder_fixed_cache(lm, out_dir / "decoder_fixed.onnx", max_seq,
                                          weights_from=out_dir / "decoder.onnx")
    np.save(out_dir / "embed_tokens.npy", lm.embed.weight.detach().float().numpy())


def quantize_export(fp32_dir, out_dir, precision: str, calib_images=None, log=print) -> Path:
    """An fp32 export -> a lower-precision copy in out_dir (fp16: fp16 graphs with fp32 islands, for ONNX Runtime
    on CUDA; int8: int8 vision + int8 decoder weights; int4: int8 vision + int4 decoder weights), with its drift
    against the fp32 export recorded in the manifest. A transaction like export_model."""
    if precision not in EXPORT_PRECISIONS or precision == "fp32":
        raise ValueError(f"precision={precision!r}: expected one of {tuple(EXPORT_PRECISIONS)[1:]}")
    fp32_dir, out_dir = Path(fp32_dir), Path(out_dir)
    read_manifest(fp32_dir, verify_checksums=False)
    check_destination(out_dir, source=fp32_dir)
    with staged(out_dir) as work:
        _quantize_into(fp32_dir, work, precision, calib_images, log)
    return out_dir / MANIFEST_NAME


def _quantize_into(reference_dir: Path, out_dir: Path, precision: str, calib_images, log) -> None:
    from edgevl import EdgeVL
    from edgevl.cpu import describe as describe_cpu
    from edgevl.drift import compare_drift, drift_outputs

    from .quantize import (calibration_tiles, fuse_cpu_vision, quantize_decoder_weights, quantize_vision_int8,
                           write_amx_vision, write_avx2_decoder)

    recipe = EXPORT_PRECISIONS[precision]
    manifest = read_manifest(reference_dir, verify_checksums=False)
    # Everything but the fp32 graphs (and their external weights), which the quantized ones replace.
    shutil.copytree(reference_dir, out_dir, ignore=shutil.ignore_patterns("*.onnx", "*.onnx.data"),
                    dirs_exist_ok=True)
    # TensorRT's fixed-cache decoder is built from fp32 exports only; the copy does not carry it.
    kv_cache = replace(manifest.kv_cache, decoder_fixed=None)
    graphs = replace(manifest.graphs, decoder_fixed=None)
    if precision == "fp16":
        from .trt.precision import write_precision_graph

        for kind in ("vision", "decoder"):
            with _stage(log, f"{kind} fp16 (normalisations, softmax and residual adds fp32)"):
                write_precision_graph(reference_dir / f"{kind}.onnx", out_dir / f"{kind}.onnx", kind, "fp16")
        kv_cache = replace(kv_cache, dtype="float16")
        quantization = {kind: "fp16 weights and activations; normalisations, softmax and residual adds fp32"
                        for kind in ("vision", "decoder")}
    else:
        with _stage(log, f"vision int8 (static Q/DQ, calibrated on {calib_images or 'generated images'})"):
            quantize_vision_int8(reference_dir / "vision.onnx", out_dir / "vision.onnx",
                                 calibration_tiles(calib_images, manifest.spec.tiling), log)
            log(f"[export] vision: {fuse_cpu_vision(out_dir / 'vision.onnx')}")
            on_tiles = write_amx_vision(out_dir / "vision.onnx", out_dir / "vision_amx.onnx")
            log(f"[export] vision_amx.onnx: {on_tiles}, for the CPUs with AMX edgevl.cpu names")
        with _stage(log, f"decoder {recipe.decoder}"):
            scheme, fused_attention = quantize_decoder_weights(
                reference_dir / "decoder.onnx", out_dir / "decoder.onnx", recipe.decoder_weights,
                asdict(manifest.spec.decoder), manifest.limits.max_seq, log)
        if recipe.kv_layout == "shared" and not fused_attention:  # a graph edgevl did not export this way
            raise ExportError(f"{reference_dir / 'decoder.onnx'}: its attention could not be fused into "
                              "GroupQueryAttention, which the shared KV layout of this precision needs; re-export it "
                              "from the checkpoint with this edgevl")
        log(f"[export] decoder: {scheme}, attention fused (GroupQueryAttention)")
        on_edgevl_ops = write_avx2_decoder(out_dir / "decoder.onnx", out_dir / "decoder_avx2.onnx")
        log(f"[export] decoder_avx2.onnx: {on_edgevl_ops}, for the x86 CPUs edgevl.cpu names")
        graphs = replace(graphs, decoder_avx2="decoder_avx2.onnx", vision_amx="vision_amx.onnx")
        kv_cache = SHARED_KV
        quantization = {"vision": "static int8 Q/DQ, symmetric, on the matmuls' inputs; attention "
                                  "(MultiHeadAttention) and normalisations fp32, attention bf16 (fp32 sums and "
                                  "softmax) in vision_amx.onnx, which CPUs with AMX run", "decoder": scheme}
    manifest = replace(manifest, graphs=graphs, kv_cache=kv_cache,
                       precision=Precision(recipe.vision, recipe.decoder), quantization=quantization)
    write_manifest(out_dir, manifest)
    with _stage(log, "drift against fp32"):
        # One model loaded at a time: the fp32 reference's outputs first, then the candidate's on the same inputs.
        reference = drift_outputs(EdgeVL.from_pretrained(reference_dir))
        release_memory()
        drift = compare_drift(reference, drift_outputs(EdgeVL.from_pretrained(out_dir), inputs_from=reference))
    log("[export] drift vs fp32: " + format_drift(drift))
    # The CPU it was measured on: integer kernels differ between ISA classes (edgevl.cpu).
    write_manifest(out_dir, replace(manifest, drift_vs_fp32={**drift, "measured_on": describe_cpu()}))


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    return {"edgevl": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}
