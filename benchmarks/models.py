"""The model directories a benchmark runs on: a checkpoint (given, or random weights with a real shape, or the
tiny test model) and one `edgevl export` per ONNX precision. Written once into a cache directory and reused; the
export time is measured when the export is made and kept next to it (`bench_export.json`)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from edgevl.manifest import is_export_dir, read_manifest

# backend name -> (how it runs, precision, device). precision: `edgevl export --precision` for onnxruntime,
# `edgevl build --precision` for tensorrt (plans built from an fp32 export), the weights' dtype for torch (None:
# fp32), None for transformers.
BACKENDS = {
    "transformers": ("transformers", None, "cpu"),
    "torch": ("torch", None, "cpu"),
    "ort-fp32": ("onnxruntime", "fp32", "cpu"),
    "ort-int8": ("onnxruntime", "int8", "cpu"),
    "ort-int4": ("onnxruntime", "int4", "cpu"),
    "torch-cuda-fp16": ("torch", "fp16", "cuda"),  # PyTorch eager on the GPU: the baseline GPU users know
    "ort-cuda-fp16": ("onnxruntime", "fp16", "cuda"),
    "trt-fp16": ("tensorrt", "fp16", "cuda"),
    "trt-int8": ("tensorrt", "int8", "cuda"),
    "trt-int4-llm": ("tensorrt", "int4-llm", "cuda"),
}
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path.home() / ".cache" / "edgevl-benchmarks"
EXPORT_RECORD = "bench_export.json"


@dataclass
class ModelSource:
    """Where the rows' models come from: `original` runs edgevl (torch, export), `hf` runs transformers."""

    name: str  # shape name, "tiny", or the --model directory's name
    original: Path
    hf: Path | None  # None: no -hf copy (a user's --model), the transformers row is not available
    cache: Path

    def export_dir(self, precision: str, runtime: str = "onnxruntime") -> Path:
        return self.cache / (f"export-{precision}" if runtime == "onnxruntime" else f"plans-{precision}")


def shaped_source(shape: str, cache: Path, log=print) -> ModelSource:
    from edgevl.testing.shaped import write_shaped_checkpoint

    root = Path(cache) / f"{shape}-seed0"
    dirs = {fmt: root / fmt for fmt in ("original", "hf")}
    if not all((d / "config.json").is_file() for d in dirs.values()):
        log(f"[bench] writing random {shape} weights (original + hf formats) to {root} ...")
        start = time.perf_counter()
        write_shaped_checkpoint(root, shape)
        log(f"[bench] done in {time.perf_counter() - start:.0f} s")
    return ModelSource(shape, dirs["original"], dirs["hf"], root)


def tiny_source(cache: Path) -> ModelSource:
    from edgevl.testing.checkpoints import write_tiny_checkpoint

    root = Path(cache) / "tiny-qwen2"
    dirs = {fmt: root / fmt for fmt in ("original", "hf")}
    for fmt, d in dirs.items():
        if not (d / "config.json").is_file():
            write_tiny_checkpoint(d, family="qwen2", fmt=fmt)
    return ModelSource("tiny", dirs["original"], dirs["hf"], root)


def model_source(model_dir: Path, cache: Path) -> ModelSource:
    """A user's checkpoint. transformers runs it only when it is in the -hf format."""
    from edgevl.specs import checkpoint_format, read_config

    model_dir = Path(model_dir)
    fmt = checkpoint_format(read_config(model_dir), model_dir)
    return ModelSource(model_dir.name, model_dir, model_dir if fmt == "hf" else None,
                       Path(cache) / f"model-{model_dir.resolve().as_posix().strip('/').replace('/', '_')}")


def ensure_export(source: ModelSource, precision: str, max_tiles: int, log=print,
                  runtime: str = "onnxruntime") -> tuple[Path, dict]:
    """The export directory for `precision` (made now if missing or made with other limits) and its record:
    export_s, the seconds `edgevl.export.export_model` took (fp32 re-export and drift included for int8/int4; for
    runtime "tensorrt" an fp32 export and `edgevl build --precision precision` into it), and peak_rss_bytes of the
    process that exported (its own process, so the figure is the export's; with the processes it runs the torch
    exports in, edgevl.export.memory.export_peak_rss_bytes)."""
    out = source.export_dir(precision, runtime)
    record_path = out / EXPORT_RECORD
    if record_path.is_file() and (out / "manifest.json").is_file():
        record = json.loads(record_path.read_text())
        if (record.get("max_tiles", 0) >= max_tiles and record.get("source") == str(source.original)
                and not _stale_cpu_graph(out, precision, runtime, log)):
            return out, record
    if out.exists():
        shutil.rmtree(out)
    log(f"[bench] exporting {source.name} at {precision} to {out} ...")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.models", str(source.original), str(out), precision,
                           str(max_tiles), runtime], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("[export]"):
            log(line)
    if proc.returncode != 0 or not record_path.is_file():
        raise RuntimeError(f"export {precision} of {source.original} failed (exit {proc.returncode}):\n"
                           + "\n".join(proc.stdout.splitlines()[-15:]))
    record = json.loads(record_path.read_text())
    log(f"[bench] export {precision} took {record['export_s']:.0f} s, "
        f"peak RSS {record['peak_rss_bytes'] / 2**30:.1f} GiB")
    return out, record


def _stale_cpu_graph(out: Path, precision: str, runtime: str, log) -> bool:
    """An int8/int4 export made by an older edgevl: without decoder_avx2.onnx, or with one whose attention is still
    ONNX Runtime's GroupQueryAttention (not edgevl's) or whose SwiGLU is still its own nodes (not folded into the
    matmul), or a vision graph whose attention is not one MultiHeadAttention node (export/quantize.py,
    fuse_cpu_vision), or without vision_amx.onnx. It would run slower than a new export, so the benchmarks make it
    again rather than time what a new export would not run."""
    if runtime != "onnxruntime" or precision not in ("int8", "int4"):
        return False
    graphs = json.loads((out / "manifest.json").read_text()).get("graphs", {})
    graph = graphs.get("decoder_avx2")
    nodes = _graph_nodes(out / graph) if graph else []
    if not graph:
        why = "no decoder_avx2.onnx"
    elif any(n.op_type == "GroupQueryAttention" and n.domain != "edgevl" for n in nodes):
        why = "decoder_avx2.onnx without edgevl's GroupQueryAttention"
    elif any(n.op_type == "Split" for n in nodes):
        why = "decoder_avx2.onnx without its matmul epilogues"
    elif not any(n.op_type == "MultiHeadAttention" for n in _graph_nodes(out / "vision.onnx")):
        why = "vision.onnx without its fused attention"
    elif not graphs.get("vision_amx"):
        why = "no vision_amx.onnx"
    else:
        return False
    log(f"[bench] {out}: made by an older edgevl ({why}), exporting again")
    return True


def _graph_nodes(path: Path) -> list:
    import onnx

    return list(onnx.load(str(path), load_external_data=False).graph.node)


def _export_main(argv) -> int:
    from edgevl.export import export_model

    from edgevl.export.memory import export_peak_rss_bytes

    model_dir, out, precision, max_tiles, runtime = Path(argv[0]), Path(argv[1]), argv[2], int(argv[3]), argv[4]
    log = lambda m: print(m, flush=True)  # noqa: E731
    start = time.perf_counter()
    if runtime == "tensorrt":
        from edgevl.export.trt import build_engines

        export_model(model_dir, out, precision="fp32", max_tiles=max_tiles, log=log)
        build_engines(out, precision=precision, log=log)
    else:
        export_model(model_dir, out, precision=precision, max_tiles=max_tiles, log=log)
    record = {"export_s": time.perf_counter() - start, "peak_rss_bytes": export_peak_rss_bytes(),
              "max_tiles": max_tiles, "source": str(model_dir)}
    # Outside the manifest's file list on purpose: the export stays valid, the record is ours.
    (out / EXPORT_RECORD).write_text(json.dumps(record))
    return 0


def dir_bytes(path: Path, skip=(EXPORT_RECORD,)) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and p.name not in skip)


def onnx_bytes(path: Path) -> int:
    """A graph file plus the external data files its initializers point to (not other files beside it)."""
    return sum(f.stat().st_size for f in _onnx_files(path))


def _onnx_files(path: Path) -> set[Path]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {path} | {path.parent / entry.value for init in model.graph.initializer
                     if init.data_location == onnx.TensorProto.EXTERNAL for entry in init.external_data
                     if entry.key == "location"}


# The graphs the ONNX Runtime backend opens; decoder_fixed.onnx is read only by `edgevl build`.
RUNTIME_GRAPHS = ("vision", "decoder")


def loaded_bytes(model_dir: Path) -> int:
    """Bytes of the files a backend reads: for an export, the graphs ONNX Runtime opens with the external data
    they reference (each file once: graphs may share one), the embedding table and the small files; for a
    checkpoint, the whole directory."""
    model_dir = Path(model_dir)
    if not is_export_dir(model_dir):
        return dir_bytes(model_dir)
    graphs = read_manifest(model_dir, verify_checksums=False).graphs
    files = set().union(*(_onnx_files(model_dir / getattr(graphs, kind)) for kind in RUNTIME_GRAPHS))
    total = sum(f.stat().st_size for f in files)
    big = {p.name for p in model_dir.glob("*.onnx.data")} | {p.name for p in model_dir.glob("*.onnx")}
    return total + dir_bytes(model_dir, skip=(EXPORT_RECORD, *big))


if __name__ == "__main__":  # python -m benchmarks.models MODEL_DIR OUT PRECISION MAX_TILES (ensure_export's child)
    sys.exit(_export_main(sys.argv[1:]))
