"""`edgevl doctor`: what this machine can run, and why a backend cannot. Every probe is lazy and fails soft:
a missing library or driver becomes a line in the report, never an exception."""
from __future__ import annotations

import importlib
import os
import platform
import sys
from dataclasses import asdict, dataclass, field

from .cpu import integer_gemm, isa_classes
from .device import gpu_info

# glibc malloc settings for CPU inference: transparent huge pages for what it allocates, and no trimming of the
# heap or mmap of mid-size blocks (either would keep re-faulting 2 MiB pages). Without them a decode step streams
# every weight through 4 KiB pages (a TLB miss per page; hardware prefetchers stop at page edges): on the
# project's 2-core Xeon the InternVL2-1B int8 decode step went from 25.2 to 23.6 ms, load and prefill unchanged
# (hugetlb=1 alone cost +1.3 s of load). glibc >= 2.35 reads GLIBC_TUNABLES once, when the process starts.
HUGE_PAGE_MALLOC = {"glibc.malloc.hugetlb": "1", "glibc.malloc.trim_threshold": str(1 << 30),
                    "glibc.malloc.mmap_threshold": str(32 << 20)}


def _tunables(env) -> dict:
    return dict(item.split("=", 1) for item in env.get("GLIBC_TUNABLES", "").split(":") if "=" in item)


def with_huge_page_malloc(env: dict) -> dict:
    """A copy of env whose GLIBC_TUNABLES holds HUGE_PAGE_MALLOC; tunables already set there win."""
    tunables = {**HUGE_PAGE_MALLOC, **_tunables(env)}
    return {**env, "GLIBC_TUNABLES": ":".join(f"{k}={v}" for k, v in tunables.items())}


def malloc_setting(env) -> str:
    """A process started with env: its glibc malloc settings, as reports print them."""
    return f"GLIBC_TUNABLES={env['GLIBC_TUNABLES']}" if env.get("GLIBC_TUNABLES") else "glibc defaults"


def huge_page_malloc_active(env=os.environ) -> bool:
    tunables = _tunables(env)
    return all(tunables.get(k) == v for k, v in HUGE_PAGE_MALLOC.items())


@dataclass
class BackendStatus:
    name: str
    available: bool
    reason: str  # why not, or what it will run on


@dataclass
class DoctorReport:
    python: str
    machine: str
    jetson: str | None  # the L4T release line on a Jetson, else None
    gpu: dict | None  # name, compute_capability, integrated, total_memory_bytes, index
    gpu_problem: str | None  # why no GPU was found
    cuda_driver: str | None  # the CUDA version the driver supports, e.g. "12.6"
    cuda_python: str | None
    nvrtc: str | None
    tensorrt: str | None
    onnxruntime: str | None
    onnxruntime_providers: list[str] = field(default_factory=list)
    torch: str | None = None
    cpu_isa: list[str] = field(default_factory=list)  # edgevl.cpu.isa_classes()
    integer_gemm: dict | None = None  # edgevl.cpu.IntegerGemm.to_dict(): how int8 graphs are computed here
    notes: list[str] = field(default_factory=list)
    backends: list[BackendStatus] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # ImportError, or a library that fails to load its shared objects
        return None
    return str(getattr(mod, "__version__", "installed"))


def _cuda_version(code: int) -> str:
    return f"{code // 1000}.{code % 1000 // 10}"


def _jetson_release() -> str | None:
    try:
        with open("/etc/nv_tegra_release") as f:
            return f.readline().strip() or None
    except OSError:
        return None


def _cuda_driver_version() -> str | None:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return None
    err, code = cudart.cudaDriverGetVersion()
    return _cuda_version(code) if err == cudart.cudaError_t.cudaSuccess and code else None


def _nvrtc_version() -> str | None:
    try:
        from cuda.bindings import nvrtc
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception:  # no cuda-python, or no libnvrtc to load
        return None
    return f"{major}.{minor}" if int(err) == 0 else None


def _ort_providers() -> list[str]:
    try:
        import onnxruntime
    except Exception:
        return []
    return list(onnxruntime.get_available_providers())


def _integer_gemm() -> dict | None:
    try:
        return integer_gemm().to_dict()
    except Exception:  # no onnxruntime, or one that cannot load
        return None


def diagnose() -> DoctorReport:
    report = DoctorReport(python=platform.python_version(), machine=f"{platform.system()} {platform.machine()}",
                          jetson=_jetson_release(), gpu=None, gpu_problem=None, cuda_driver=_cuda_driver_version(),
                          cuda_python=_version("cuda.bindings"), nvrtc=_nvrtc_version(),
                          tensorrt=_version("tensorrt"), onnxruntime=_version("onnxruntime"),
                          onnxruntime_providers=_ort_providers(), torch=_version("torch"),
                          cpu_isa=list(isa_classes()), integer_gemm=_integer_gemm())
    try:
        report.gpu = gpu_info()
    except RuntimeError as e:
        report.gpu_problem = str(e)
    report.notes = _notes(report)
    report.backends = [_onnxruntime_status(report), _tensorrt_status(report), _torch_status(report),
                       _kernels_status(report)]
    return report


def _notes(r: DoctorReport) -> list[str]:
    notes = []
    if r.cuda_python and r.cuda_driver:
        bindings_major, driver_major = int(r.cuda_python.split(".")[0]), int(r.cuda_driver.split(".")[0])
        if bindings_major > driver_major:
            notes.append(f"cuda-python {r.cuda_python} targets CUDA {bindings_major}, the driver supports CUDA "
                         f"{r.cuda_driver}: install cuda-python=={driver_major}.* (JetPack 6 is CUDA 12)")
    if r.gpu and r.gpu["integrated"]:
        notes.append("integrated GPU (Jetson): GPU memory is the system's DRAM; memory reports are process totals")
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc" and not huge_page_malloc_active():
        notes.append("CPU inference: start Python with GLIBC_TUNABLES=" + with_huge_page_malloc({})["GLIBC_TUNABLES"]
                     + " (huge pages for the weights: int8 decode ~6% faster; glibc >= 2.35)")
    return notes


def _onnxruntime_status(r: DoctorReport) -> BackendStatus:
    if r.onnxruntime is None:
        return BackendStatus("onnxruntime", False, "onnxruntime is not installed (pip install onnxruntime)")
    cuda = "CUDAExecutionProvider" in r.onnxruntime_providers
    if cuda and r.gpu:
        where = "CPU and CUDA"
    elif cuda:
        where = f"CPU only: CUDAExecutionProvider is installed but there is no usable GPU ({r.gpu_problem})"
    else:
        where = "CPU only (onnxruntime-gpu adds CUDA)"
    return BackendStatus("onnxruntime", True, where)


def _tensorrt_status(r: DoctorReport) -> BackendStatus:
    missing = []
    if r.gpu is None:
        missing.append(f"TensorRT needs an NVIDIA GPU and its driver, and this machine has none usable "
                       f"({r.gpu_problem}); TensorRT plans are compiled for and run on a specific GPU")
    if r.tensorrt is None:
        missing.append("the tensorrt Python module is not installed (pip install 'edgevl[gpu]'; on Jetson it comes "
                       "with JetPack: apt install python3-libnvinfer)")
    if r.cuda_python is None:
        missing.append("cuda-python is not installed (the TensorRT backend allocates device memory through it)")
    if missing:
        return BackendStatus("tensorrt", False, "; ".join(missing))
    return BackendStatus("tensorrt", True, f"TensorRT {r.tensorrt} on {r.gpu['name']} "
                                           f"(sm_{r.gpu['compute_capability'].replace('.', '')}); build plans with "
                                           "`edgevl build EXPORT_DIR`")


def _torch_status(r: DoctorReport) -> BackendStatus:
    if r.torch is None:
        return BackendStatus("torch", False, "PyTorch is not installed (pip install 'edgevl[torch]'); only needed "
                                             "for checkpoints and export")
    import torch

    cuda = torch.cuda.is_available()
    return BackendStatus("torch", True, f"PyTorch {r.torch}, " + ("CPU and CUDA" if cuda else "CPU only"))


def _kernels_status(r: DoctorReport) -> BackendStatus:
    if r.cuda_python is None or r.nvrtc is None:
        return BackendStatus("gpu-preprocess", False, "GPU tiling kernels need cuda-python and NVRTC "
                                                      "(pip install 'edgevl[gpu]')")
    if r.gpu is None:
        return BackendStatus("gpu-preprocess", False, f"NVRTC {r.nvrtc} compiles the kernels, but there is no GPU "
                                                      f"to run them ({r.gpu_problem}); CPU tiling is used")
    arch = r.gpu["compute_capability"].replace(".", "")
    return BackendStatus("gpu-preprocess", True, f"NVRTC {r.nvrtc} for sm_{arch}")


def format_report(r: DoctorReport) -> str:
    def show(value):
        return value if value else "not found"

    gpu = (f"{r.gpu['name']} (compute capability {r.gpu['compute_capability']}, "
           f"{r.gpu['total_memory_bytes'] / 2**30:.1f} GiB{', integrated' if r.gpu['integrated'] else ''})"
           if r.gpu else f"none ({r.gpu_problem})")
    lines = [f"python        {r.python} ({r.machine})"]
    if r.jetson:
        lines.append(f"jetson        {r.jetson}")
    lines += [f"gpu           {gpu}", f"cuda driver   {show(r.cuda_driver)}", f"cuda-python   {show(r.cuda_python)}",
              f"nvrtc         {show(r.nvrtc)}", f"tensorrt      {show(r.tensorrt)}",
              f"onnxruntime   {show(r.onnxruntime)} (providers: {', '.join(r.onnxruntime_providers) or 'none'})",
              f"torch         {show(r.torch)}", f"cpu isa       {', '.join(r.cpu_isa) or 'not read'}",
              f"int8 gemm     {r.integer_gemm['description'] if r.integer_gemm else 'not probed (no onnxruntime)'}",
              "", "backends:"]
    for b in r.backends:
        lines.append(f"  {b.name:<15} {'yes' if b.available else 'NO '}  {b.reason}")
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)
