"""TensorRT backend for an exported directory with plans from `edgevl build`. Never imports torch; tensorrt and
cuda-python are imported when a backend is built, so `import edgevl` needs neither.

Device-side design (see export/trt/config.py for the profiles):
- one CUDA stream; every copy and every execute_async_v3 is enqueued on it, the host waits only for logits and
  image embeddings;
- an `Engine` per plan owns its engine, one execution context per optimization profile (a profile may be
  active in one context at a time) and one activation scratch shared by those contexts (they never run
  concurrently: same stream);
- named device buffers are allocated once, at their largest shape, and bound with set_tensor_address each call;
- the KV cache never leaves the device: two max_seq-capacity buffers per KV tensor, ping-ponged (present of a
  step is written to the other buffer; a TensorRT output may not alias an input). Plans built with
  `--kv-cache concat` read [1, kv, P, d] and write [1, kv, P + S, d] densely; `--kv-cache fixed` plans read and
  write [1, kv, max_seq, d] (the step's rows scattered in at its positions, later rows masked), so those buffers
  are zeroed once: masked rows get weight 0, and 0 x NaN from uninitialised memory would still be NaN;
- host<->device copies only for pixel values / image embeddings and inputs_embeds / logits, through pinned
  staging buffers so the copies are truly asynchronous.
CUDA graphs (cuda_graph=True, fixed plans only): a captured graph fixes shapes and addresses, which the concat
layout changes every token. With the fixed layout the decode step's shapes are static and its addresses depend
only on the ping-pong parity, so each parity gets its own execution context (bound once, never rebound) and its
decode step is captured once, right after that context first ran it (TensorRT's recipe: run once, then capture);
later steps copy the token's embedding and position into the same device buffers and launch the graph. A failed
capture raises: there is no silent fallback to uncaptured steps.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..manifest import GPU, ExportError, Manifest, Profile, TensorRTSection
from ..cpu import process_memory_bytes
from ..device import CudaGraph, DeviceBuffer, PinnedBuffer, check, device_index, gpu_info
from .exported import ExportedBackend

INSTALL_HINT = ("pip install 'edgevl[gpu]' (TensorRT + cuda-python); on Jetson, TensorRT comes with JetPack "
                "(apt install python3-libnvinfer) and cuda-python must match its CUDA 12 "
                "(pip install 'cuda-python<13')")


class PlanMismatchError(ExportError):
    """Plans built for another TensorRT version or GPU: they must be rebuilt on this machine."""


# -- plain logic (tested without a GPU) -----------------------------------------------------------------------

def check_plan_compatibility(section: TensorRTSection, trt_version: str, gpu: dict, export_dir="") -> list[str]:
    """Raise PlanMismatchError when the plans cannot load here; return warnings for plans that load but were
    tuned on another GPU model of the same architecture (e.g. built on an AGX Orin, run on an Orin NX)."""
    rebuild = f"rebuild them here: edgevl build {export_dir or 'EXPORT_DIR'}"
    if section.version != trt_version:
        raise PlanMismatchError(f"{export_dir}: the TensorRT plans were built with TensorRT {section.version}, "
                                f"this is TensorRT {trt_version}; plans only load in the version that built them: "
                                f"{rebuild}")
    built: GPU = section.gpu
    if built.compute_capability != gpu["compute_capability"]:
        raise PlanMismatchError(f"{export_dir}: the TensorRT plans were built for {built.name} (compute "
                                f"capability {built.compute_capability}), this GPU is {gpu['name']} "
                                f"(compute capability {gpu['compute_capability']}): {rebuild}")
    if built.name != gpu["name"]:
        return [f"TensorRT plans were built on {built.name}, running on {gpu['name']} (same architecture): "
                f"they load, but kernels were timed on the other GPU; {rebuild} for best speed"]
    return []


def profile_for(profiles: list[Profile], shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the first optimization profile whose ranges contain every given shape."""
    for index, profile in enumerate(profiles):
        ranges = profile.shapes
        if all(name in ranges and len(shape) == len(ranges[name][0]) and
               all(lo <= s <= hi for s, lo, hi in zip(shape, ranges[name][0], ranges[name][2]))
               for name, shape in shapes.items()):
            return index
    raise ValueError(f"no optimization profile covers shapes {shapes}; profiles: "
                     f"{[p.name for p in profiles]} (rebuild with larger --max-tiles / --max-seq)")


def plans_present(export_dir, manifest: Manifest) -> bool:
    section = manifest.tensorrt
    return section is not None and all((Path(export_dir) / name).is_file()
                                       for name in (section.plans.vision, section.plans.decoder))


def tensorrt_unavailable_reason() -> str | None:
    """None when tensorrt imports and a GPU is visible; else why not (used to pick the default backend)."""
    try:
        gpu_info()
    except RuntimeError as e:  # asked first: without a GPU, TensorRT could not run even if installed
        return f"no usable GPU ({e})"
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # ImportError, or libnvinfer failing to load
        return f"tensorrt does not import ({e})"
    return None


# -- CUDA through cuda-python ---------------------------------------------------------------------------------

def _imports():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ImportError(f"backend='tensorrt' needs TensorRT ({e}): {INSTALL_HINT}") from None
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise ImportError(f"backend='tensorrt' needs cuda-python: {INSTALL_HINT}") from None
    return trt, cudart


class Engine:
    """One plan (TensorRT samples' common.py shape): engine, a context per profile, shared scratch, named I/O."""

    def __init__(self, trt, cudart, runtime, plan_path: Path, stream):
        self.trt, self.cudart, self.stream, self.path = trt, cudart, stream, plan_path
        plan = plan_path.read_bytes()
        self.plan_bytes = len(plan)
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise PlanMismatchError(f"{plan_path}: TensorRT could not deserialize this plan (built by another "
                                    f"TensorRT version or for another GPU?): rebuild with edgevl build")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        profiles = self.engine.num_optimization_profiles
        self.scratch_bytes = max(self._scratch_size(p) for p in range(profiles))
        self.scratch = DeviceBuffer(cudart, self.scratch_bytes)
        self.contexts = [self.new_context(p) for p in range(profiles)]

    def _scratch_size(self, profile: int) -> int:
        engine = self.engine
        if hasattr(engine, "get_device_memory_size_for_profile_v2"):  # TensorRT >= 10.1
            return int(engine.get_device_memory_size_for_profile_v2(profile))
        return int(engine.device_memory_size)

    def new_context(self, profile: int):
        """An execution context on `profile` using the shared scratch (contexts of an Engine never run at once)."""
        strategy = self.trt.ExecutionContextAllocationStrategy.USER_MANAGED
        context = self.engine.create_execution_context(strategy)
        if context is None:
            raise RuntimeError(f"{self.path}: could not create an execution context for profile {profile}")
        if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1
            context.set_device_memory(self.scratch.ptr, self.scratch_bytes)
        else:
            context.device_memory = self.scratch.ptr
        if not context.set_optimization_profile_async(profile, self.stream):
            raise RuntimeError(f"{self.path}: could not select optimization profile {profile}")
        return context

    def run(self, profile: int, shapes: dict[str, tuple[int, ...]], addresses: dict[str, int], context=None) -> None:
        """Set input shapes and every I/O address on the profile's context (or `context`, one made by
        new_context(profile)), then enqueue on the stream (no synchronisation)."""
        context = context or self.contexts[profile]
        for name, shape in shapes.items():
            if not context.set_input_shape(name, tuple(int(s) for s in shape)):
                raise ValueError(f"{self.path.name}: shape {shape} for {name} is outside profile {profile}")
        unresolved = context.infer_shapes()
        if unresolved:
            raise ValueError(f"{self.path.name}: input shapes not set for {list(unresolved)}")
        for name in self.inputs + self.outputs:
            context.set_tensor_address(name, addresses[name])
        if not context.execute_async_v3(self.stream):
            raise RuntimeError(f"{self.path.name}: execute_async_v3 failed (see TensorRT's log above)")

    def output_shape(self, profile: int, name: str) -> tuple[int, ...]:
        return tuple(self.contexts[profile].get_tensor_shape(name))

    def close(self):
        self.contexts, self.engine = [], None
        self.scratch.close()


class TensorRTBackend(ExportedBackend):
    min_seq = 2  # a fixed-cache plan's prefill profile starts at 2 positions

    def __init__(self, export_dir, manifest: Manifest, device: str = "cuda", max_seq: int | None = None,
                 cuda_graph: bool = False):
        export_dir = Path(export_dir)
        section = manifest.tensorrt
        if section is None:
            raise ExportError(f"{export_dir}: no TensorRT plans in this export: run `edgevl build {export_dir}`")
        self.fixed_cache = section.kv_cache.layout == "fixed-ping-pong"
        if cuda_graph and not self.fixed_cache:
            raise ValueError(f"cuda_graph=True needs a decoder plan with a fixed-capacity KV cache; these plans use "
                             f"the {section.kv_cache.layout} layout, whose decode shapes change every token: "
                             f"rebuild with `edgevl build {export_dir} --kv-cache fixed`")
        super().__init__(export_dir, manifest, section.limits, max_seq, "these plans were built", "rebuild")
        self.vision_batch = self.max_tiles
        index = device_index(device)
        try:
            gpu = gpu_info(index)
        except RuntimeError as e:  # asked first: without a GPU, installing TensorRT would not help
            raise RuntimeError(f"backend='tensorrt' needs an NVIDIA GPU and this machine has none usable ({e}); "
                               "use backend='onnxruntime' here") from None
        trt, cudart = _imports()
        for warning in check_plan_compatibility(section, trt.__version__, gpu, export_dir):
            warnings.warn(warning, stacklevel=3)
        check(cudart.cudaSetDevice(index), f"cudaSetDevice({index})")
        self.trt, self.cudart, self.gpu = trt, cudart, gpu
        free, total = check(cudart.cudaMemGetInfo(), "cudaMemGetInfo")
        self._baseline_used, self._peak_used = total - free, 0
        self.stream = check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self.vision = Engine(trt, cudart, runtime, export_dir / section.plans.vision, self.stream)
        self.decoder = Engine(trt, cudart, runtime, export_dir / section.plans.decoder, self.stream)
        self.profiles = section.profiles
        spec = manifest.spec
        self.hidden_size = spec.decoder.hidden_size
        self.vocab_size = spec.decoder.vocab_size
        self._allocate(spec, section.limits.max_seq)
        self._current = 0
        # parity -> (its own decode context, its captured step); filled on the first decode of each parity
        self._graphs = {} if cuda_graph else None
        self._track_memory()

    # -- buffers ---------------------------------------------------------------------------------------------

    def _allocate(self, spec, plan_max_seq: int) -> None:
        cudart, dec = self.cudart, spec.decoder
        size = self.image_size = spec.vision.image_size
        tokens_per_tile = 256  # (448 / 14 * 0.5)^2, fixed by InternVL's pixel shuffle
        vision_shapes = {"pixel_values": (self.max_tiles, 3, size, size),
                         "image_embeds": (self.max_tiles, tokens_per_tile, self.hidden_size)}
        self._vision_dev = {n: DeviceBuffer(cudart, np.prod(s) * self.vision.dtypes[n].itemsize)
                            for n, s in vision_shapes.items()}
        self._vision_host = {n: PinnedBuffer(cudart, s, self.vision.dtypes[n]) for n, s in vision_shapes.items()}
        kv, head_dim = dec.num_kv_heads, dec.head_dim
        io_shapes = {"inputs_embeds": (self.max_seq, self.hidden_size), "position_ids": (self.max_seq,),
                     "logits": (self.vocab_size,)}
        self._dec_dev = {n: DeviceBuffer(cudart, np.prod(s) * self.decoder.dtypes[n].itemsize)
                         for n, s in io_shapes.items()}
        self._dec_host = {n: PinnedBuffer(cudart, s, self.decoder.dtypes[n]) for n, s in io_shapes.items()}
        self._past_names = [n for n in self.decoder.inputs if n.startswith("past_key_values.")]
        self._kv_shape = (1, kv, head_dim)
        # A fixed plan's cache shape is static at the plan's max_seq, whatever the runtime limit.
        self._capacity = plan_max_seq if self.fixed_cache else self.max_seq
        kv_bytes = kv * self._capacity * head_dim * self.decoder.dtypes[self._past_names[0]].itemsize
        self._kv = {n: (DeviceBuffer(cudart, kv_bytes), DeviceBuffer(cudart, kv_bytes)) for n in self._past_names}
        self.kv_cache_bytes = 2 * kv_bytes * len(self._past_names)
        if self.fixed_cache:
            for buffer in (b for pair in self._kv.values() for b in pair):
                check(cudart.cudaMemsetAsync(buffer.ptr, 0, buffer.nbytes, self.stream), "cudaMemsetAsync")
            self._sync()

    def _copy_in(self, host: PinnedBuffer, device: DeviceBuffer, nbytes: int) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        check(self.cudart.cudaMemcpyAsync(device.ptr, host.ptr, nbytes, kind, self.stream), "HtoD")

    def _copy_out(self, device: DeviceBuffer, host: PinnedBuffer, nbytes: int) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(self.cudart.cudaMemcpyAsync(host.ptr, device.ptr, nbytes, kind, self.stream), "DtoH")

    def _sync(self) -> None:
        check(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        self._track_memory()

    # -- Backend protocol ------------------------------------------------------------------------------------

    @property
    def vision_input_dtype(self) -> np.dtype:
        return self.vision.dtypes["pixel_values"]

    def _encode(self, tiles: np.ndarray) -> np.ndarray:
        n = len(tiles)
        host_in = self._vision_host["pixel_values"]
        host_in.array[:n] = tiles
        self._copy_in(host_in, self._vision_dev["pixel_values"], host_in.array[:n].nbytes)
        return self._run_vision(self._vision_dev["pixel_values"].ptr, tiles.shape)

    def _encode_device(self, ptr: int, tiles: int, dtype) -> np.ndarray:
        """Pixel values already on this GPU (GPU tiling), bound in place (no host copy). The preprocessor has
        finished writing them (synchronized its stream); only the embeddings come back."""
        self._check_device_dtype(dtype)
        return self._run_vision(ptr, (tiles, 3, self.image_size, self.image_size))

    def _run_vision(self, pixels_ptr: int, shape: tuple[int, ...]) -> np.ndarray:
        n = shape[0]
        profile = profile_for(self.profiles["vision"], {"pixel_values": shape})
        host_out = self._vision_host["image_embeds"]
        addresses = {"pixel_values": pixels_ptr, "image_embeds": self._vision_dev["image_embeds"].ptr}
        self.vision.run(profile, {"pixel_values": shape}, addresses)
        out_shape = self.vision.output_shape(profile, "image_embeds")
        out = host_out.array[:n]
        self._copy_out(self._vision_dev["image_embeds"], host_out, out.nbytes)
        self._sync()
        return np.array(out.reshape(out_shape), dtype=np.float32)  # a copy: the staging buffer is reused

    def _reset(self) -> None:
        self._current = 0

    def _step(self, embeds: np.ndarray) -> np.ndarray:
        n, past = len(embeds), self._pos
        host, dev = self._dec_host, self._dec_dev
        host["inputs_embeds"].array[:n] = embeds
        host["position_ids"].array[:n] = np.arange(past, past + n)
        self._copy_in(host["inputs_embeds"], dev["inputs_embeds"], host["inputs_embeds"].array[:n].nbytes)
        self._copy_in(host["position_ids"], dev["position_ids"], host["position_ids"].array[:n].nbytes)
        kv, head_dim = self._kv_shape[1], self._kv_shape[2]
        shapes = {"inputs_embeds": (1, n, self.hidden_size), "position_ids": (1, n)}
        cached = self._capacity if self.fixed_cache else past
        shapes.update({name: (1, kv, cached, head_dim) for name in self._past_names})
        profile = profile_for(self.profiles["decoder"], shapes)
        addresses = {name: b.ptr for name, b in dev.items()}
        for name, pair in self._kv.items():
            addresses[name] = pair[self._current].ptr
            addresses[name.replace("past_key_values.", "present.")] = pair[1 - self._current].ptr
        if self._graphs is not None and past > 0:  # a decode step (a prompt of one token is past == 0)
            self._run_captured(profile, shapes, addresses)
        else:
            self.decoder.run(profile, shapes, addresses)
        self._copy_out(dev["logits"], host["logits"], host["logits"].array.nbytes)
        self._sync()
        self._pos, self._current = past + n, 1 - self._current
        return host["logits"].array.astype(np.float32)  # a copy, and fp16 -> fp32 for sampling

    def _run_captured(self, profile: int, shapes: dict, addresses: dict) -> None:
        """This parity's decode step: the first time on its own context, then captured; afterwards the graph."""
        parity = self._current
        if parity in self._graphs:
            self._graphs[parity][1].launch()
            return
        context = self.decoder.new_context(profile)
        self.decoder.run(profile, shapes, addresses, context)
        graph = CudaGraph(self.cudart, self.stream, lambda: context.execute_async_v3(self.stream),
                          f"the decode step (KV parity {parity})")
        self._graphs[parity] = (context, graph)

    # -- memory ----------------------------------------------------------------------------------------------

    def _track_memory(self) -> None:
        free, total = check(self.cudart.cudaMemGetInfo(), "cudaMemGetInfo")
        self._peak_used = max(self._peak_used, total - free - self._baseline_used)

    def memory_report(self) -> dict:
        """Bytes: what this backend allocated, and the peak device use observed since it was created. On an
        integrated GPU (Jetson) device memory is system DRAM, so the process's peak RSS is added."""
        buffers = [*self._vision_dev.values(), *self._dec_dev.values(), *(b for p in self._kv.values() for b in p)]
        report = {"plans_bytes": self.vision.plan_bytes + self.decoder.plan_bytes,
                  "activation_scratch_bytes": self.vision.scratch_bytes + self.decoder.scratch_bytes,
                  "kv_cache_bytes": self.kv_cache_bytes,
                  "io_buffers_bytes": sum(b.nbytes for b in buffers) - self.kv_cache_bytes,
                  "device_peak_used_bytes": self._peak_used, "integrated": self.gpu["integrated"]}
        if self.gpu["integrated"]:
            rss = process_memory_bytes("VmHWM")
            report["process_peak_rss_bytes"] = rss
            report["process_total_peak_bytes"] = (rss or 0) + self._peak_used
        return report

    def close(self) -> None:
        for _, graph in (self._graphs or {}).values():
            graph.close()
        self._graphs = {} if self._graphs is not None else None
        for engine in (self.vision, self.decoder):
            engine.close()
        for buffer in [*self._vision_dev.values(), *self._vision_host.values(), *self._dec_dev.values(),
                       *self._dec_host.values(), *(b for p in self._kv.values() for b in p)]:
            buffer.close()
        if self.stream is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None

