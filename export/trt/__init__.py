"""`edgevl build`: TensorRT plans from an `edgevl export` directory, recorded in its manifest.

config.py     precisions, optimization profiles, manifest section (plain data, tested on CPU)
precision.py  the ONNX rewrite that fixes each tensor's type (fp16 with fp32 islands, weight-only int8/int4)
builder.py    the TensorRT calls (parse, profiles, strongly typed build, timing cache)
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from edgevl.precisions import build_recipe

from .config import (DEFAULT_KV_CACHE, DEFAULT_PRECISION, DEFAULT_WORKSPACE_GB, KV_CACHE_LAYOUTS, PLAN_NAMES,
                     check_limits, check_tensorrt_supports, decoder_profiles, source_graphs,
                     tensorrt_section, vision_profiles)

__all__ = ["KV_CACHE_LAYOUTS", "build_engines"]


def build_engines(export_dir, precision: str = DEFAULT_PRECISION, max_tiles: int | None = None,
                  max_seq: int | None = None, workspace_gb: float = DEFAULT_WORKSPACE_GB, timing_cache=None,
                  calib_images=None, kv_cache: str = DEFAULT_KV_CACHE, log=print) -> Path:
    """Build vision.plan and decoder.plan into `export_dir` for the GPU of this machine and record them in its
    manifest (re-written, so its checksums cover the plans). kv_cache: "concat" or "fixed" (the decoder graph;
    "fixed" is what TensorRTBackend's cuda_graph=True needs, see config.py). Returns the manifest path."""
    from edgevl.device import gpu_info
    from edgevl.manifest import read_manifest, write_manifest

    from ..trt_ops import trt_incompatibilities
    from .builder import build_plan, import_tensorrt
    from .precision import write_precision_graph

    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    max_tiles, max_seq = check_limits(manifest, max_tiles, max_seq)
    sources = source_graphs(manifest, precision, kv_cache)
    if workspace_gb <= 0:
        raise ValueError(f"workspace_gb={workspace_gb}: expected > 0")
    try:
        gpu = gpu_info()
    except RuntimeError as e:
        raise RuntimeError(f"edgevl build needs an NVIDIA GPU: TensorRT compiles plans for the GPU it runs on, and "
                           f"this machine has none usable ({e}). Build on the target device (e.g. on the Jetson "
                           "itself), or run this export with backend onnxruntime; `edgevl doctor` says more") from None
    trt = import_tensorrt()
    check_tensorrt_supports(precision, trt.__version__, gpu["compute_capability"])
    dec = manifest.spec.decoder
    profiles = {"vision": vision_profiles(max_tiles, manifest.spec.vision.image_size),
                "decoder": decoder_profiles(max_seq, dec.hidden_size, dec.num_layers, dec.num_kv_heads, dec.head_dim,
                                            kv_cache=kv_cache)}
    log(f"[build] TensorRT {trt.__version__} on {gpu['name']} (compute capability {gpu['compute_capability']}), "
        f"precision {precision}, tiles 1..{max_tiles}, max_seq {max_seq}, KV cache {kv_cache}")
    seconds, built = {}, {}
    timing_cache = Path(timing_cache) if timing_cache else None
    with tempfile.TemporaryDirectory(prefix=".edgevl-build-", dir=export_dir) as tmp:
        recipe = build_recipe(precision)
        for kind, graph_precision in (("vision", recipe.vision), ("decoder", recipe.decoder)):
            source, needs_quantizing = sources[kind]
            src = export_dir / source
            if needs_quantizing:
                src = _calibrate_vision(src, Path(tmp) / "vision.int8.onnx", manifest, calib_images, log)
            graph = Path(tmp) / f"{kind}.trt.onnx"
            start = time.perf_counter()
            quantized = write_precision_graph(src, graph, kind, graph_precision)
            _check_parsable(graph, trt_incompatibilities)
            log(f"[build] {kind}: {graph_precision} graph ready in {time.perf_counter() - start:.1f} s"
                + (f" ({quantized} weights {graph_precision.split('-')[0]})" if quantized else "") + f"; building "
                f"{len(profiles[kind])} profile(s): {', '.join(p.name for p in profiles[kind])}")
            built[kind] = Path(tmp) / PLAN_NAMES[kind]
            seconds[kind] = build_plan(graph, built[kind], profiles[kind], int(workspace_gb * 2**30), timing_cache,
                                       log)
            log(f"[build] {kind}: {built[kind].stat().st_size / 2**20:.1f} MiB plan in {seconds[kind]:.1f} s")
        for kind, path in built.items():  # only now: a failed build leaves the old plans and manifest intact
            os.replace(path, export_dir / PLAN_NAMES[kind])
    section = tensorrt_section(trt.__version__, gpu, precision, max_tiles, max_seq, profiles, seconds, kv_cache)
    path = write_manifest(export_dir, replace(manifest, tensorrt=section))
    log(f"[build] done: {', '.join(PLAN_NAMES.values())} in {export_dir} (run it: edgevl generate --model "
        f"{export_dir} --backend tensorrt ...). Gate it: compare against the onnxruntime fp32 backend first.")
    return path


def _calibrate_vision(src: Path, dst: Path, manifest, calib_images, log) -> Path:
    from ..quantize import calibration_tiles, quantize_vision_int8

    tiling = manifest.spec.tiling
    start = time.perf_counter()
    log(f"[build] vision: calibrating int8 Q/DQ on {calib_images or 'generated images'} (ONNX Runtime, CPU) ...")
    quantize_vision_int8(src, dst, calibration_tiles(Path(calib_images) if calib_images else None, tiling))
    log(f"[build] vision: calibrated in {time.perf_counter() - start:.1f} s")
    return dst


def _check_parsable(graph: Path, trt_incompatibilities) -> None:
    import onnx

    problems = trt_incompatibilities(onnx.load(str(graph), load_external_data=False))
    if problems:
        raise ValueError(f"{graph.name}: TensorRT's ONNX parser does not support {', '.join(problems)}")
