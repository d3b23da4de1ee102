"""`edgevl selftest`: prove an install correct on this device, polygraphy-style (same inputs, two runtimes).

For each LLM family a tiny random checkpoint is written (the generator the tests use), the PyTorch reference
runs it (checked against transformers when installed), it is exported, and every backend this machine can run
is compared with the reference: ONNX Runtime CPU / CUDA at fp32, int8 and int4, TensorRT (fp16, and int8 vision
with an fp16 decoder), and the CUDA kernels against the CPU preprocessing. What cannot run here is listed with
`edgevl doctor`'s reason. Exit status 0 only when at least one check ran and every check passed.

JSON output (`--json FILE`, stable; `format_version` changes on any incompatible change):
  {"format_version": 1, "edgevl_version": str, "passed": bool, "seconds": float,
   "cpu": {"isa": [str], "integer_gemm": {...}} or null (edgevl.cpu.describe(): how int8 is computed here),
   "checks":  [{"component", "family", "backend", "check", "value", "threshold", "passed", "seconds"}],
   "not_run": [{"what", "why"}]}
`threshold` is a string such as ">= 0.9999" or "<= 0.0001"; `value` a float.
"""
from __future__ import annotations

import json
import operator
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .cpu import describe as describe_cpu
from .drift import cosine, greedy_agreement, measure_drift
from .precisions import BUILD_PRECISIONS, EXPORT_PRECISIONS

FAMILIES = ("qwen2", "internlm2", "phi3")
BACKENDS = ("pytorch", "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt", "kernels")
TRT_PRECISIONS = tuple(name for name, recipe in BUILD_PRECISIONS.items() if recipe.drift_bounds)
QUANTIZED = ("int8", "int4")  # ONNX Runtime exports checked against the fp32 one
JSON_FORMAT_VERSION = 1
# fp32 backends against the fp32 PyTorch reference: the same math in another runtime.
FP32_EMBED_COSINE = 0.99999
FP32_MAX_ABS_DIFF = 1e-3
NEW_TOKENS = 32
UINT8_STEP = 1.0  # GPU tiles vs CPU tiles, in uint8 steps before normalisation


@dataclass
class Check:
    component: str
    family: str
    backend: str
    check: str
    value: float
    threshold: str
    passed: bool
    seconds: float = 0.0


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    not_run: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    cpu: dict | None = None

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)  # nothing checked proves nothing

    def to_json(self) -> dict:
        return {"format_version": JSON_FORMAT_VERSION, "edgevl_version": __version__, "passed": self.passed,
                "seconds": round(self.seconds, 2), "cpu": self.cpu, "checks": [asdict(c) for c in self.checks],
                "not_run": self.not_run}


_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq}


def _check(report: Report, component, family, backend, name, value, op: str, bound, started: float) -> None:
    value = float(value)
    report.checks.append(Check(component, family, backend, name, value, f"{op} {bound}",
                               bool(_OPS[op](value, bound)), time.perf_counter() - started))


def _available(backends, kept_exports: bool) -> tuple[list[str], list[dict], bool]:
    """Which of BACKENDS run here, why the others do not, and whether PyTorch (the reference) is here."""
    wanted = list(BACKENDS) if backends == "auto" else list(backends)
    unknown = sorted(set(wanted) - set(BACKENDS))
    if unknown:
        raise ValueError(f"unknown backends {unknown}: expected some of {BACKENDS} or 'auto'")
    reasons = _unavailable_reasons(kept_exports)
    run = [b for b in wanted if b not in reasons]
    skipped = [{"what": b, "why": reasons[b]} for b in wanted if b in reasons]
    return run, skipped, "pytorch" not in reasons


def _unavailable_reasons(kept_exports: bool) -> dict[str, str]:
    """Why a backend cannot run here, in `edgevl doctor`'s words. With kept_exports (every family's fp32, int8 and
    int4 exports from an earlier run's --keep directory) ONNX Runtime's drift checks need no PyTorch."""
    from .doctor import diagnose

    status = {b.name: b for b in diagnose().backends}
    reasons = {}
    if not status["torch"].available:
        reasons["pytorch"] = status["torch"].reason
    try:
        import onnx  # noqa: F401
    except ImportError:
        reasons["pytorch"] = "onnx is not installed: pip install 'edgevl[export]'"
    ort = status["onnxruntime"]
    if not ort.available:
        reasons["onnxruntime-cpu"] = ort.reason
    if not ort.available or not ort.reason.startswith("CPU and CUDA"):
        reasons["onnxruntime-cuda"] = ort.reason
    for name, doctor_name in (("tensorrt", "tensorrt"), ("kernels", "gpu-preprocess")):
        if not status[doctor_name].available:
            reasons[name] = status[doctor_name].reason
    if "pytorch" in reasons:  # the reference and the exports need it
        for name in ("tensorrt",) if kept_exports else ("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt"):
            reasons.setdefault(name, f"the reference and the test exports need PyTorch ({reasons['pytorch']})")
    return reasons


def _reference_checks(report: Report, family: str, reference, hf_dir: Path) -> None:
    """The PyTorch reference itself against transformers' InternVLForConditionalGeneration, when installed."""
    try:
        import torch
        import transformers
    except ImportError:
        report.not_run.append({"what": f"pytorch vs transformers ({family})",
                               "why": "transformers is not installed (pip install 'edgevl[dev]')"})
        return
    from .preprocess import preprocess_image
    from .synthetic import synthetic_image

    started = time.perf_counter()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model = transformers.InternVLForConditionalGeneration.from_pretrained(hf_dir).eval()
    pixel_values = preprocess_image(synthetic_image(900, 500), reference.spec.tiling)
    with torch.no_grad():
        theirs = model.model.get_image_features(torch.from_numpy(pixel_values)).pooler_output.numpy()
    ours = reference.backend.encode_images(pixel_values)
    _check(report, "vision", family, "pytorch vs transformers", "image-embedding max abs diff",
           np.abs(ours - theirs).max(), "<=", FP32_MAX_ABS_DIFF, started)


def _fp32_backend_checks(report: Report, family: str, backend: str, reference, candidate) -> None:
    from .preprocess import preprocess_image
    from .synthetic import synthetic_image

    started = time.perf_counter()
    image = synthetic_image(900, 500)
    pixel_values = preprocess_image(image, reference.spec.tiling)
    ref, cand = reference.backend.encode_images(pixel_values), candidate.backend.encode_images(pixel_values)
    _check(report, "vision", family, backend, "image-embedding cosine", cosine(ref, cand), ">=",
           FP32_EMBED_COSINE, started)
    _check(report, "vision", family, backend, "image-embedding max abs diff", np.abs(ref - cand).max(), "<=",
           FP32_MAX_ABS_DIFF, started)
    started = time.perf_counter()
    a = reference.generate("Describe the image.", image, max_new_tokens=NEW_TOKENS).token_ids
    b = candidate.generate("Describe the image.", image, max_new_tokens=NEW_TOKENS).token_ids
    _check(report, "pipeline", family, backend, f"greedy-token agreement ({NEW_TOKENS} tokens)",
           greedy_agreement(a, b), "==", 1.0, started)


def _drift_checks(report: Report, family: str, label: str, bounds: dict[str, float], reference, candidate) -> None:
    started = time.perf_counter()
    drift = measure_drift(reference, candidate, NEW_TOKENS)
    for metric, floor in bounds.items():
        _check(report, "vision" if metric.startswith("image") else "decoder", family, label,
               metric.replace("_", " "), drift[metric], ">=", floor, started)


def _tensorrt_checks(report: Report, family: str, fp32_dir: Path, work: Path, reference) -> None:
    from . import EdgeVL
    from .export.trt import build_engines

    for precision in TRT_PRECISIONS:
        plans = work / f"tensorrt-{precision}"
        if not (plans / "vision.plan").is_file():
            shutil.rmtree(plans, ignore_errors=True)
            shutil.copytree(fp32_dir, plans)
            build_engines(plans, precision=precision, log=lambda _: None)
        engine = EdgeVL.from_pretrained(plans, backend="tensorrt")
        _drift_checks(report, family, f"tensorrt {precision} vs pytorch fp32",
                      BUILD_PRECISIONS[precision].drift_bounds, reference, engine)


def _kernel_checks(report: Report) -> None:
    from .kernels.launch import CudaKernels
    from .preprocess import IMAGENET_STD, TilingConfig, preprocess_image
    from .synthetic import synthetic_image

    kernels = CudaKernels()
    step = np.asarray(IMAGENET_STD, np.float32)[None, :, None, None] / 255  # one uint8 step, normalised
    for w, h in ((64, 64), (1920, 1080), (3840, 2160)):
        image = synthetic_image(w, h)
        for order in ("RGB", "BGR"):
            started = time.perf_counter()
            src = image if order == "RGB" else np.ascontiguousarray(image[..., ::-1])
            gpu = kernels.assemble_tiles_numpy(src, TilingConfig(), order)
            cpu = preprocess_image(image, TilingConfig())
            steps = np.abs(gpu - cpu).max(axis=(0, 2, 3)) / step[0, :, 0, 0] if gpu.shape == cpu.shape else [1e9]
            _check(report, "tile_assembly", "-", "kernels vs cpu", f"{w}x{h} {order} max uint8 steps",
                   max(steps), "<=", UINT8_STEP, started)
    try:
        import torch

        from .modeling import pixel_shuffle
    except ImportError:  # a Jetson may run edgevl without PyTorch; the reference pixel shuffle is torch code
        report.not_run.append({"what": "kernels: pixel shuffle", "why": "the reference (edgevl.modeling) needs "
                               "PyTorch: pip install 'edgevl[torch]'"})
        return
    started = time.perf_counter()
    x = np.random.default_rng(0).standard_normal((3, 32, 32, 64)).astype(np.float32)
    for version in ("v1", "v2"):
        expected = pixel_shuffle(torch.from_numpy(x), 0.5, version).reshape(3, 256, -1).numpy()
        src, out = kernels.upload(x), kernels.alloc(x.nbytes)
        kernels.pixel_shuffle(src.ptr, out.ptr, 3, 32, 64, version)
        got = kernels.download(out, expected.shape, np.float32)
        _check(report, "pixel_shuffle", "-", "kernels vs torch", f"{version} max abs diff",
               np.abs(got - expected).max(), "==", 0.0, started)


def selftest(backends="auto", keep=None, families=FAMILIES, log=print) -> Report:
    """Run every check this machine can run; see the module docstring for what and the JSON schema."""
    if keep is None:
        with tempfile.TemporaryDirectory(prefix="edgevl-selftest-") as tmp:
            return selftest(backends, tmp, families, log)
    start = time.perf_counter()
    work = Path(keep)
    run, not_run, has_torch = _available(backends, kept_exports=all(
        _kept(work / family / f"export-{p}") for family in families for p in ("fp32", *QUANTIZED)))
    report = Report(not_run=not_run, cpu=_cpu())
    if {"pytorch", "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt"} & set(run):
        for family in families:
            log(f"[selftest] {family}: " + ("pytorch reference, export, " if has_torch else "kept exports, ")
                + "onnxruntime ...")
            _family_checks(report, family, work / family, run, has_torch)
    if "kernels" in run:
        log("[selftest] CUDA kernels vs CPU preprocessing ...")
        _kernel_checks(report)
    report.seconds = time.perf_counter() - start
    return report


def _cpu() -> dict | None:
    try:
        return describe_cpu()
    except ImportError:  # no onnxruntime: nothing here computes int8
        return None


def _family_checks(report: Report, family: str, work: Path, run: list[str], has_torch: bool) -> None:
    from . import EdgeVL

    quiet = lambda _: None  # noqa: E731
    fp32_dir, reference = work / "export-fp32", None
    if has_torch:
        from .export import export_model
        from .testing.checkpoints import write_tiny_checkpoint

        checkpoint = write_tiny_checkpoint(work / "checkpoint", family)
        reference = EdgeVL.from_pretrained(checkpoint)
        _reference_checks(report, family, reference, write_tiny_checkpoint(work / "checkpoint-hf", family, fmt="hf"))
        if not _kept(fp32_dir):
            export_model(checkpoint, fp32_dir, log=quiet)
    else:  # no PyTorch here: the exports kept by an earlier run (made on any machine) against each other
        report.not_run.append({"what": f"onnxruntime fp32 vs pytorch ({family})",
                               "why": "PyTorch is not installed; the kept exports were checked against each other"})
    for backend in (b for b in run if b.startswith("onnxruntime")):
        device = backend.split("-")[1]
        fp32 = EdgeVL.from_pretrained(fp32_dir, device=device)
        if reference is not None:
            _fp32_backend_checks(report, family, f"{backend} fp32", reference, fp32)
        for precision in QUANTIZED:
            out = work / f"export-{precision}"
            if not _kept(out):
                from .export import quantize_export

                quantize_export(fp32_dir, out, precision, log=quiet)
            _drift_checks(report, family, f"{backend} {precision} vs fp32", EXPORT_PRECISIONS[precision].drift_bounds,
                          fp32, EdgeVL.from_pretrained(out, device=device))
    if "tensorrt" in run:
        _tensorrt_checks(report, family, fp32_dir, work, reference)


def _kept(export_dir: Path) -> bool:
    """An export an earlier run left in --keep, intact and made by this edgevl: reused, not made again (the tiny
    checkpoints are the same every run)."""
    from .manifest import ExportError, read_manifest

    try:
        read_manifest(export_dir)
    except ExportError:
        return False
    return True


def format_report(report: Report) -> str:
    header = ("component", "family", "backend", "check", "value", "threshold", "result", "s")
    rows = [(c.component, c.family, c.backend, c.check, f"{c.value:.6g}", c.threshold,
             "pass" if c.passed else "FAIL", f"{c.seconds:.1f}") for c in report.checks]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths))  # noqa: E731
    out = [line(header), line(["-" * w for w in widths]), *map(line, rows), ""]
    if report.cpu:
        out.append(f"cpu: {', '.join(report.cpu['isa']) or 'ISA not read'}; int8 GEMM: "
                   f"{report.cpu['integer_gemm']['description']}")
    out += ["not run:"] + [f"  {n['what']}: {n['why']}" for n in report.not_run] if report.not_run else []
    failed = sum(not c.passed for c in report.checks)
    out.append(f"\n{len(report.checks) - failed} passed, {failed} failed, {len(report.not_run)} not run "
               f"in {report.seconds:.0f} s: " + ("PASS" if report.passed else "FAIL") +
               ("" if report.checks else " (no check could run here: see 'not run')"))
    return "\n".join(out)


def write_json(report: Report, path) -> None:
    Path(path).write_text(json.dumps(report.to_json(), indent=2))
