"""The CUDA runtime, for everything in edgevl that touches a GPU (the TensorRT backend, `edgevl doctor`, the GPU check):
probing, device strings, error checks, device and pinned buffers, CUDA graphs. cuda-python is imported by the calls
that need it, so importing this module needs no GPU and no cuda-python.

The tiling kernels (edgevl.kernels.launch) load modules and launch through the driver API, which shares the runtime's
primary context; their buffers and launches stay there."""
from __future__ import annotations

import ctypes

import numpy as np


def device_index(device: str) -> int:
    """"cuda" -> 0, "cuda:N" -> N; other devices (a backend's "cpu" default) mean GPU 0."""
    if device.startswith("cuda:"):
        try:
            return int(device.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"device={device!r}: expected 'cuda' or 'cuda:N'") from None
    return 0


def gpu_info(index: int = 0) -> dict:
    """name, compute capability ("8.7"), integrated (Jetson: shares DRAM with the CPU), total memory; raises
    RuntimeError saying why there is no usable GPU."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise RuntimeError("cuda-python is not installed (pip install 'edgevl[gpu]')") from None
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess:
        hint = {"cudaErrorInsufficientDriver": "no NVIDIA driver is loaded, or it is older than this cuda-python "
                                               "needs",
                "cudaErrorNoDevice": "the driver sees no NVIDIA GPU"}.get(err.name, "")
        raise RuntimeError(f"cudaGetDeviceCount: {err.name}" + (f" ({hint})" if hint else ""))
    if index >= count:
        raise RuntimeError(f"GPU {index} requested, {count} present")
    err, prop = cudart.cudaGetDeviceProperties(index)
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"cudaGetDeviceProperties({index}): {err.name}")
    name = prop.name.decode(errors="replace").rstrip("\0") if isinstance(prop.name, bytes) else str(prop.name)
    return {"index": index, "name": name, "compute_capability": f"{prop.major}.{prop.minor}",
            "integrated": bool(prop.integrated), "total_memory_bytes": int(prop.totalGlobalMem),
            "multiprocessors": int(prop.multiProcessorCount)}


def check(result, what: str, error: type[Exception] = RuntimeError):
    """The value of a cuda-python call (runtime, driver and NVRTC alike return (status, *values), status 0 for
    success): one value, a list of several, or None; else `error` naming the call and the status."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise error(f"{what} failed: {getattr(err, 'name', err)}")
    return rest[0] if len(rest) == 1 else (rest or None)


class DeviceBuffer:
    """cudaMalloc'd memory; freed by close() or when collected."""

    def __init__(self, cudart, nbytes: int):
        self._cudart, self.nbytes = cudart, int(nbytes)
        self.ptr = int(check(cudart.cudaMalloc(max(self.nbytes, 256)), f"cudaMalloc({nbytes})"))

    def close(self):
        if getattr(self, "ptr", 0):
            try:
                self._cudart.cudaFree(self.ptr)
            except Exception:  # interpreter shutdown: the bindings may already be gone
                pass
            self.ptr = 0

    __del__ = close


class PinnedBuffer:
    """Page-locked host memory viewed as a numpy array, so cudaMemcpyAsync does not fall back to a sync copy."""

    def __init__(self, cudart, shape, dtype):
        self._cudart, dtype = cudart, np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        self.ptr = int(check(cudart.cudaMallocHost(max(nbytes, 256)), f"cudaMallocHost({nbytes})"))
        raw = (ctypes.c_byte * nbytes).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=dtype).reshape(shape)

    def close(self):
        if getattr(self, "ptr", 0):
            self.array = None
            try:
                self._cudart.cudaFreeHost(self.ptr)
            except Exception:
                pass
            self.ptr = 0

    __del__ = close


class CudaGraph:
    """One captured `enqueue()` (an execute_async_v3 whose context already ran with these shapes and addresses),
    instantiated once and replayed by launch() on the same stream."""

    def __init__(self, cudart, stream, enqueue, what: str):
        self._cudart, self.stream, self.graph, self.exec = cudart, stream, None, None
        success = cudart.cudaError_t.cudaSuccess
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(cudart.cudaStreamBeginCapture(stream, mode), f"cudaStreamBeginCapture ({what})")
        enqueued = False
        try:
            enqueued = enqueue()
        finally:  # always end the capture: a stream left capturing fails every later call on it
            err, graph = cudart.cudaStreamEndCapture(stream)
            if err != success or not enqueued:
                if graph:
                    cudart.cudaGraphDestroy(graph)
        if err != success or not enqueued:
            reason = (f"cudaStreamEndCapture returned {err.name} (something in the step is not capturable)"
                      if err != success else "execute_async_v3 returned False while capturing (see TensorRT's log)")
            raise RuntimeError(f"capturing {what} as a CUDA graph failed: {reason}; run without cuda_graph=True")
        self.graph = graph
        self.exec = check(cudart.cudaGraphInstantiate(graph, 0), f"cudaGraphInstantiate ({what})")

    def launch(self) -> None:
        check(self._cudart.cudaGraphLaunch(self.exec, self.stream), "cudaGraphLaunch")

    def close(self) -> None:
        try:
            if self.exec is not None:
                self._cudart.cudaGraphExecDestroy(self.exec)
            if self.graph is not None:
                self._cudart.cudaGraphDestroy(self.graph)
        except Exception:  # interpreter shutdown: the bindings may already be gone
            pass
        self.exec = self.graph = None

    __del__ = close
