"""The backends, as one table: what each loads, where it runs by default, whether its vision engine reads device
memory (so GPU tiles can be handed to it), its row in `edgevl doctor`, and the module that implements it (imported
only when that backend is built: torch, onnxruntime and tensorrt are optional). Adding a backend is a row here and
its module.

base.py      the calls every backend answers (encode_images, embed_tokens, prefill, decode, max_seq)
exported.py  what the backends of an `edgevl export` directory share
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class BackendEntry:
    loads: str  # "checkpoint" (a checkpoint directory) or "export" (an `edgevl export` directory)
    module: str  # edgevl.backends.<module>
    class_name: str
    default_device: str
    gpu_vision: Callable[[str], bool]  # device -> whether its vision engine reads device memory there
    install: str  # what to install when its module does not import
    doctor: str  # its row in `edgevl doctor`, which says whether it can run here and why not


BACKENDS: dict[str, BackendEntry] = {
    "torch": BackendEntry("checkpoint", "torch_backend", "TorchBackend", "cpu", lambda device: False,
                          "pip install 'edgevl[torch]'", "torch"),
    "onnxruntime": BackendEntry("export", "onnxruntime_backend", "OnnxRuntimeBackend", "cpu",
                                lambda device: device.startswith("cuda"),
                                "pip install onnxruntime (or onnxruntime-gpu for CUDA)", "onnxruntime"),
    "tensorrt": BackendEntry("export", "tensorrt_backend", "TensorRTBackend", "cuda", lambda device: True,
                             "pip install 'edgevl[gpu]'", "tensorrt"),
}


def backend_entry(name: str) -> BackendEntry:
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: expected one of {tuple(BACKENDS)}")
    return BACKENDS[name]


def backend_class(name: str):
    """The class of backend `name`, its module imported now; ImportError naming what to install."""
    entry = backend_entry(name)
    try:
        module = importlib.import_module(f"{__name__}.{entry.module}")
    except ImportError as e:
        raise ImportError(f"backend={name!r} needs {e.name or e}: {entry.install}") from None
    return getattr(module, entry.class_name)
