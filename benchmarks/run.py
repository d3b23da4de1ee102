"""`python -m benchmarks run`: every backend measured in one run, each in its own process, then the roofline,
the ratios to transformers eager, the JSON, the table and the plots."""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from edgevl.doctor import malloc_setting, with_huge_page_malloc
from edgevl.manifest import read_manifest

from . import machine
from .models import BACKENDS, REPO_ROOT, ModelSource, dir_bytes, ensure_export, loaded_bytes, onnx_bytes
from .plan import decode_bytes_per_token, kv_cache_bytes

SCHEMA = "edgevl-benchmark/1"


@dataclass(frozen=True)
class RunConfig:
    backends: tuple[str, ...]
    tiles: tuple[int, ...]
    prompt_tokens: int
    new_tokens: int
    repeat: int
    contexts: tuple[int, ...] = ()  # positions of a generation's last token, for the context curve
    threads: int | None = None  # None: each runtime's default
    bandwidth_mib: int = 1024
    quick: bool = False
    huge_page_malloc: bool = True  # workers start with edgevl.doctor.HUGE_PAGE_MALLOC in GLIBC_TUNABLES


def worker_env(config: RunConfig) -> dict:
    """The environment every worker starts with: this repository importable, and the malloc config asks for."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return with_huge_page_malloc(env) if config.huge_page_malloc else env


def run_benchmarks(source: ModelSource, config: RunConfig, out_dir: Path, command: str = "", log=print) -> dict:
    unknown = [b for b in config.backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"--backends {','.join(unknown)}: expected some of {', '.join(BACKENDS)}")
    started = datetime.datetime.now().astimezone()
    start = time.perf_counter()
    max_tiles = max(13, *config.tiles)
    exports = {}
    for backend in config.backends:  # all exports first: none of them overlaps a measurement
        runtime, precision, device = BACKENDS[backend]
        unavailable = _unavailable(runtime, device)
        if unavailable:
            exports[backend] = unavailable
        elif runtime in ("onnxruntime", "tensorrt"):
            try:
                exports[backend] = ensure_export(source, precision, max_tiles, log=log, runtime=runtime)
            except RuntimeError as e:  # that row says why; the other rows still run
                log(f"[bench] {backend}: {e}")
                exports[backend] = str(e).splitlines()[0]
    raw_dir = source.cache / "runs" / started.strftime("%Y%m%d-%H%M%S")
    raw_dir.mkdir(parents=True, exist_ok=True)
    log(f"[bench] measuring memory bandwidth ({config.bandwidth_mib} MiB buffer) ...")
    bandwidth = machine.memory_bandwidth(config.bandwidth_mib, repeat=3 if config.quick else 5)
    log(f"[bench] read bandwidth {bandwidth['read_bytes_per_s'] / 1e9:.1f} GB/s")
    result = {"schema": SCHEMA, "command": command, "started": started.isoformat(timespec="seconds"),
              "config": {"model": source.name, "model_dir": str(source.original), "backends": list(config.backends),
                         "tiles": list(config.tiles), "prompt_tokens": config.prompt_tokens,
                         "new_tokens": config.new_tokens, "repeat": config.repeat, "threads": config.threads,
                         "contexts": list(config.contexts),
                         "quick": config.quick, "malloc": malloc_setting(worker_env(config)),
                         "frame": "1920x1080 synthetic",
                         "ttft_image": "448x448 synthetic (1 tile)"},
              "machine": machine.describe(), "bandwidth": bandwidth,
              "background": {"before": machine.background_activity(1.0)}, "raw_dir": str(raw_dir), "rows": []}
    for backend in config.backends:
        row = _measure(backend, source, config, exports.get(backend), raw_dir, log)
        result["rows"].append(row)
    result["background"]["after"] = machine.background_activity(1.0)
    _add_roofline(result, source)
    _add_ratios(result)
    result["duration_s"] = time.perf_counter() - start
    return result


def _measure(backend: str, source: ModelSource, config: RunConfig, export, raw_dir: Path, log) -> dict:
    runtime, precision, device = BACKENDS[backend]
    row = {"backend": backend, "runtime": runtime, "device": device, "available": False, "reason": None,
           "precision": {"vision": precision or "fp32", "decoder": precision or "fp32"},
           "preprocess_gpu_ms": None, "preprocess_gpu_reason": "no GPU tiling backend on this machine (CPU run)",
           "peak_device_bytes": None, "export_s": None, "export_peak_rss_bytes": None, "drift": None}
    if isinstance(export, str):  # not available here, or its export failed: the row says why
        return {**row, "reason": export}
    if runtime == "transformers":
        reason = _transformers_missing(source)
        if reason:
            return {**row, "reason": reason}
        model_dir = source.hf
    elif runtime in ("onnxruntime", "tensorrt"):
        model_dir, record = export
        row["export_s"], row["export_peak_rss_bytes"] = record["export_s"], record.get("peak_rss_bytes")
        manifest = read_manifest(model_dir, verify_checksums=False)
        row["precision"] = (manifest.tensorrt.precision if manifest.tensorrt
                            else {"vision": manifest.precision.vision, "decoder": manifest.precision.decoder})
        row["drift"] = manifest.drift_vs_fp32
    else:
        model_dir = source.original
    row["model_dir"] = str(model_dir)
    row["model_bytes"], row["model_dir_bytes"] = loaded_bytes(model_dir), dir_bytes(model_dir)
    worker_config = {"runtime": runtime, "device": device, "model_dir": str(model_dir), "tiles": list(config.tiles),
                     "dtype": {"fp16": "float16"}.get(precision, "float32") if runtime == "torch" else "float32",
                     "prompt_tokens": config.prompt_tokens, "new_tokens": config.new_tokens,
                     "repeat": config.repeat, "threads": config.threads, "contexts": list(config.contexts)}
    config_path, result_path = raw_dir / f"{backend}.config.json", raw_dir / f"{backend}.json"
    config_path.write_text(json.dumps(worker_config))
    row["others_busy_before"] = machine.background_activity(1.0)
    log(f"[bench] {backend}: measuring ({model_dir}) ...")
    start = time.perf_counter()
    env = worker_env(config)
    with open(raw_dir / f"{backend}.log", "w") as worker_log:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.worker", str(config_path), str(result_path)],
                              stdout=worker_log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    if proc.returncode != 0:
        tail = (raw_dir / f"{backend}.log").read_text().strip().splitlines()[-3:]
        log(f"[bench] {backend}: FAILED (exit {proc.returncode}); log {raw_dir / f'{backend}.log'}")
        return {**row, "reason": f"worker failed (exit {proc.returncode}): {' / '.join(tail)}"}
    row.update(json.loads(result_path.read_text()))
    row.update(available=True, wall_s=time.perf_counter() - start)
    vision_ms = row["vision_ms"][str(config.tiles[0])]["median"]
    log(f"[bench] {backend}: TTFT {row['ttft_ms']['median']:.0f} ms, decode "
        f"{row['decode_tokens_per_s']['median']:.1f} tok/s, vision 1 tile {vision_ms:.0f} ms ({row['wall_s']:.0f} s)")
    return row


def _unavailable(runtime: str, device: str) -> str | None:
    """Why a row cannot run here, in edgevl's own words (doctor's probes), or None. CPU rows always can."""
    if device == "cpu":
        return None
    if runtime == "tensorrt":
        from edgevl.backends.tensorrt_backend import tensorrt_unavailable_reason

        reason = tensorrt_unavailable_reason()
        return f"TensorRT: {reason}" if reason else None
    from edgevl.doctor import diagnose

    status = {b.name: b for b in diagnose().backends}[runtime]
    return None if status.available and "CPU and CUDA" in status.reason else f"{runtime} on CUDA: {status.reason}"


def _transformers_missing(source: ModelSource) -> str | None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "transformers is not installed (pip install 'edgevl[dev]')"
    if source.hf is None:
        return "the model is not in the -hf format transformers loads (use --shape, or an -hf checkpoint)"
    return None


def _add_roofline(result: dict, source: ModelSource) -> None:
    """Bytes each decode step reads: the weights (the exported decoder file for ONNX rows, the fp32 matrices for
    the PyTorch rows) plus the KV cache at the run's mean position; the ceiling is bandwidth / bytes."""
    from edgevl.specs import read_config, spec_from_config

    spec = spec_from_config(read_config(source.original), source.original)
    bandwidth = result["bandwidth"]["read_bytes_per_s"]
    for row in result["rows"]:
        if not row.get("available"):
            continue
        if row["runtime"] == "onnxruntime":
            decoder = read_manifest(row["model_dir"], verify_checksums=False).graphs.decoder
            weights = onnx_bytes(Path(row["model_dir"]) / decoder)
            source_of_weights = "decoder ONNX graph + the external data it references"
        else:
            weights, source_of_weights = decode_bytes_per_token(spec, "fp32"), "fp32 decoder matrices + lm_head"
        mean_position = row["prompt_tokens"] + result["config"]["new_tokens"] / 2
        kv = kv_cache_bytes(spec, int(mean_position), 4)
        ceiling = bandwidth / (weights + kv)
        row["roofline"] = {"weights_bytes_per_token": weights, "kv_bytes_per_token": kv,
                           "weights_from": source_of_weights, "ceiling_tokens_per_s": ceiling,
                           "fraction": row["decode_tokens_per_s"]["median"] / ceiling}


def _add_ratios(result: dict) -> None:
    reference = next((r for r in result["rows"] if r["backend"] == "transformers" and r.get("available")), None)
    for row in result["rows"]:
        if not row.get("available"):
            continue
        if reference is None:
            row["vs_transformers"] = None
            continue
        ratio = lambda a, b: a / b if a and b else None  # noqa: E731
        row["vs_transformers"] = {
            "vision": {t: ratio(reference["vision_ms"][t]["median"], s["median"]) for t, s in row["vision_ms"].items()},
            "ttft": ratio(reference["ttft_ms"]["median"], row["ttft_ms"]["median"]),
            "decode": ratio(row["decode_tokens_per_s"]["median"], reference["decode_tokens_per_s"]["median"]),
            "peak_rss": ratio(row["peak_rss_bytes"], reference["peak_rss_bytes"])}


def write_outputs(result: dict, out_dir: Path, stem: str, plots: bool = True) -> dict[str, Path]:
    from .report import format_table, run_header, write_plots

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "table": out_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(result, indent=1))
    paths["table"].write_text(run_header(result) + "\n\n" + format_table(result) + "\n")
    if plots:
        try:
            for path in write_plots(result, out_dir, stem):
                paths[path.stem] = path
        except ImportError:
            result["plots_skipped"] = "matplotlib is not installed (pip install matplotlib)"
    return paths
