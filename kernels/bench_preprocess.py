"""Microbenchmark: one decoded frame (host uint8 HWC) to the vision engine's input [T, 3, 448, 448], four ways.

    python -m edgevl.kernels.bench_preprocess [--repeats 20] [--warmup 3] [--fp16] [--cpu-only] [--json out.json]

Workloads: a 1920x1080 frame and a 3840x2160 frame (both a 4x2 grid + thumbnail, 9 tiles, at max_tiles=12), and
the six-camera driving layout (six 1600x900 views -> 896x448 each -> 2688x896 -> 12 tiles + thumbnail).
Methods:
  pillow-cpu      edgevl.preprocess (Pillow BICUBIC + table normalisation): the reference, what preprocess="cpu" runs
  opencv-cpu      cv2.resize INTER_CUBIC + the same normalisation; NOT the reference's pixels (no antialiasing)
  torch-gpu       upload + F.interpolate(bicubic, antialias=True) + normalise on the GPU; close to, not equal to,
                  the reference (float weights, no uint8 rounding between the passes)
  edgevl-gpu      upload + the tile-assembly kernels (what preprocess="gpu" runs); equal to the reference
  edgevl-gpu-dev  the kernels alone, frame already in device memory (a camera / NVDEC pipeline)
Times are wall-clock per frame, the GPU rows synchronized, as the median over --repeats with p10-p90 spread.
Without a GPU the GPU rows are left out and the reason printed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from edgevl.preprocess import TilingConfig, num_tiles, preprocess_image, tile_grid

from .tile_plan import NORMALIZATION_TABLE

CONFIG = TilingConfig(max_tiles=12)
VIEW_SIZE = (1600, 900)  # nuScenes camera frames
WORKLOADS = ("1920x1080", "3840x2160", "six-cameras")


def make_inputs(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    frames = {name: rng.integers(0, 256, (int(name.split("x")[1]), int(name.split("x")[0]), 3), dtype=np.uint8)
              for name in WORKLOADS[:2]}
    frames["six-cameras"] = [rng.integers(0, 256, (VIEW_SIZE[1], VIEW_SIZE[0], 3), dtype=np.uint8) for _ in range(6)]
    return frames


# -- methods: each returns {workload: callable} or raises Unavailable(reason) -------------------------------

class Unavailable(Exception):
    pass


def pillow_cpu(inputs, fp16):
    from edgevl.formats.driving import CAMERA_ORDER, assemble_views

    def six(views):
        return preprocess_image(assemble_views(dict(zip(CAMERA_ORDER, views))), CONFIG)

    return {name: (lambda x=x: preprocess_image(x, CONFIG)) for name, x in inputs.items() if name != "six-cameras"} | {
        "six-cameras": lambda: six(inputs["six-cameras"])}


def _cv2():
    try:
        import cv2
    except ImportError:
        raise Unavailable("OpenCV is not installed (pip install opencv-python-headless)") from None
    return cv2


def opencv_cpu(inputs, fp16):
    cv2 = _cv2()
    size = CONFIG.image_size

    def tiles(rgb):
        h, w = rgb.shape[:2]
        cols, rows = tile_grid(w, h, CONFIG)
        out = np.empty((num_tiles(w, h, CONFIG), 3, size, size), np.float32)
        grid = cv2.resize(rgb, (cols * size, rows * size), interpolation=cv2.INTER_CUBIC)
        grid = grid.reshape(rows, size, cols, size, 3).transpose(0, 2, 4, 1, 3).reshape(rows * cols, 3, size, size)
        for c in range(3):
            out[:rows * cols, c] = NORMALIZATION_TABLE[c][grid[:, c]]
        if len(out) > rows * cols:
            thumb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_CUBIC).transpose(2, 0, 1)
            for c in range(3):
                out[-1, c] = NORMALIZATION_TABLE[c][thumb[c]]
        return out

    def six(views):
        canvas = np.empty((896, 2688, 3), np.uint8)
        for k, view in enumerate(views):
            canvas[(k // 3) * 448:(k // 3 + 1) * 448, (k % 3) * 896:(k % 3 + 1) * 896] = cv2.resize(
                view, (896, 448), interpolation=cv2.INTER_CUBIC)
        return tiles(canvas)

    return {name: (lambda x=x: tiles(x)) for name, x in inputs.items() if name != "six-cameras"} | {
        "six-cameras": lambda: six(inputs["six-cameras"])}


def torch_gpu(inputs, fp16):
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        raise Unavailable("torch is not installed") from None
    if not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise Unavailable(f"torch.cuda.is_available() is False (torch {torch.__version__}, {built})")
    dev, size = torch.device("cuda"), CONFIG.image_size
    mean = torch.tensor((0.485, 0.456, 0.406), device=dev).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225), device=dev).view(1, 3, 1, 1)
    dtype = torch.float16 if fp16 else torch.float32

    def resize(x, w, h):  # x [1, 3, H, W] float; uint8 rounding as Pillow's output
        resized = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        return resized.round_().clamp_(0, 255)

    def tiles_of(x):  # x [1, 3, H, W] float 0..255 on the device
        h, w = x.shape[-2:]
        cols, rows = tile_grid(w, h, CONFIG)
        grid = resize(x, cols * size, rows * size).view(3, rows, size, cols, size).permute(1, 3, 0, 2, 4)
        parts = [grid.reshape(rows * cols, 3, size, size)]
        if rows * cols > 1:
            parts.append(resize(x, size, size))
        return ((torch.cat(parts) / 255 - mean) / std).to(dtype)

    def frame(array):
        x = torch.from_numpy(array).to(dev).permute(2, 0, 1)[None].float()
        out = tiles_of(x)
        torch.cuda.synchronize()
        return out

    def six(views):
        canvas = torch.empty((1, 3, 896, 2688), device=dev)
        for k, view in enumerate(views):
            x = torch.from_numpy(view).to(dev).permute(2, 0, 1)[None].float()
            canvas[..., (k // 3) * 448:(k // 3 + 1) * 448, (k % 3) * 896:(k % 3 + 1) * 896] = resize(x, 896, 448)
        out = tiles_of(canvas)
        torch.cuda.synchronize()
        return out

    return {name: (lambda x=x: frame(x)) for name, x in inputs.items() if name != "six-cameras"} | {
        "six-cameras": lambda: six(inputs["six-cameras"])}


def _cuda_kernels():
    try:
        from .launch import CudaKernels, NoCudaDevice
    except ImportError as e:
        raise Unavailable(f"the kernels' launcher does not import ({e})") from None
    try:
        return CudaKernels()
    except (ImportError, NoCudaDevice) as e:
        raise Unavailable(str(e)) from None


def edgevl_gpu(inputs, fp16, frames_on_device=False):
    from .launch import DeviceImage

    kernels, size = _cuda_kernels(), CONFIG.image_size
    itemsize = 2 if fp16 else 4
    out = kernels.alloc(13 * 3 * size * size * itemsize)
    resident = {name: kernels.upload(x) for name, x in inputs.items() if name != "six-cameras"}
    staging = kernels.alloc(max(x.nbytes for name, x in inputs.items() if name != "six-cameras"))
    views = inputs["six-cameras"]
    view_bufs = [kernels.upload(v) for v in views]

    def frame(name, array):
        h, w = array.shape[:2]
        src = resident[name] if frames_on_device else kernels.upload_into(staging, array)
        kernels.assemble_tiles(src.ptr, w, h, w * 3, out.ptr, CONFIG, "RGB", 3, fp16)
        kernels.synchronize()

    def six():
        if not frames_on_device:
            for buf, view in zip(view_bufs, views):
                kernels.upload_into(buf, view)
        images = [DeviceImage(b.ptr, v.shape[1], v.shape[0], v.shape[1] * 3) for b, v in zip(view_bufs, views)]
        kernels.assemble_driving_views(images, out.ptr, CONFIG, fp16)
        kernels.synchronize()

    return {name: (lambda name=name, x=x: frame(name, x)) for name, x in inputs.items() if name != "six-cameras"} | {
        "six-cameras": six}


METHODS = {
    "pillow-cpu": (pillow_cpu, "cpu"),
    "opencv-cpu": (opencv_cpu, "cpu"),
    "torch-gpu": (torch_gpu, "gpu"),
    "edgevl-gpu": (edgevl_gpu, "gpu"),
    "edgevl-gpu-dev": (lambda inputs, fp16: edgevl_gpu(inputs, fp16, frames_on_device=True), "gpu"),
}


# -- timing and the table -----------------------------------------------------------------------------------

def time_ms(fn, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    return samples


def run(repeats: int = 20, warmup: int = 3, fp16: bool = False, cpu_only: bool = False) -> dict:
    inputs = make_inputs()
    rows, missing = [], {}
    for method, (make, device) in METHODS.items():
        if cpu_only and device == "gpu":
            missing[method] = "--cpu-only given"
            continue
        try:
            calls = make(inputs, fp16)
        except Unavailable as e:
            missing[method] = str(e)
            continue
        for workload in WORKLOADS:
            samples = time_ms(calls[workload], repeats, warmup)
            p10, p50, p90 = np.percentile(samples, [10, 50, 90])
            rows.append({"workload": workload, "method": method, "device": device, "tiles": workload_tiles(workload),
                         "median_ms": float(p50), "p10_ms": float(p10), "p90_ms": float(p90), "repeats": repeats})
    return {"rows": rows, "missing": missing, "fp16": fp16}


def workload_tiles(workload: str) -> int:
    if workload == "six-cameras":
        return num_tiles(2688, 896, CONFIG)
    w, h = (int(v) for v in workload.split("x"))
    return num_tiles(w, h, CONFIG)


def format_table(result: dict) -> str:
    lines = [f"{'workload':<13} {'tiles':>5} {'method':<15} {'median ms':>10} {'p10-p90 ms':>17}"]
    for row in sorted(result["rows"], key=lambda r: (WORKLOADS.index(r["workload"]), r["median_ms"])):
        spread = f"{row['p10_ms']:.2f}-{row['p90_ms']:.2f}"
        lines.append(f"{row['workload']:<13} {row['tiles']:>5} {row['method']:<15} {row['median_ms']:>10.2f} "
                     f"{spread:>17}")
    gpu_missing = {m: why for m, why in result["missing"].items() if METHODS[m][1] == "gpu"}
    if gpu_missing and len(gpu_missing) == sum(d == "gpu" for _, d in METHODS.values()):
        lines.append("GPU rows missing: " + "; ".join(f"{m}: {why}" for m, why in gpu_missing.items()))
    else:
        lines += [f"{m} missing: {why}" for m, why in gpu_missing.items()]
    lines += [f"{m} missing: {why}" for m, why in result["missing"].items() if METHODS[m][1] == "cpu"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgevl.kernels.bench_preprocess",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--fp16", action="store_true", help="GPU rows write float16 tiles (fp16 vision engines)")
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU rows even where a GPU is present")
    parser.add_argument("--json", help="also write the rows (and why any are missing) to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    result = run(args.repeats, args.warmup, args.fp16, args.cpu_only)
    print(f"InternVL tiling, max_tiles={CONFIG.max_tiles}, {'float16' if args.fp16 else 'float32'} output, "
          f"{args.repeats} repeats after {args.warmup} warm-up, per frame")
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
