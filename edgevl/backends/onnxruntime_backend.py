"""ONNX Runtime backend for an exported directory (CPU or CUDA). Never imports torch.

The decoder runs through IOBinding and the KV cache never leaves the device. Two layouts (the manifest's
kv_cache.layout): "concat" (each step's `present.*` OrtValues are bound as the next step's `past_key_values.*`,
the Concat inside the graph is the only copy) and "shared" (GroupQueryAttention graphs: one max_seq-capacity
buffer per KV tensor, bound as both past and present and written in place; nothing is copied). Only the logits
come back to the host.

On CPU the prompt is prefilled in chunks of PREFILL_CHUNK_CPU positions (each chunk one run that extends the cache),
and GroupQueryAttention runs its plain kernel rather than its tiled "flash" one. Both measured on the project's 2-core
Xeon with the InternVL2-1B-shaped int8 export: chunks of 256 prefill 662 / 1900 / 3400 positions in 0.54 / 2.03 /
4.88 s against 0.80 / 3.15 / 7.18 s in one run (the chunk's activations, such as the MLP's [rows, 4864] halves and the
attention scores, stay in cache, and later chunks skip the fully masked part of the scores); each row's result does
not depend on the chunk it ran in (logits bit-identical in fp32 / int8 / int4 exports). The plain GQA kernel decodes
0.7-2.7 ms a token faster at 662-3400 past positions (of ~24-35 ms); it materializes a run's [heads, rows, past]
scores, which the chunking bounds (256 x 4096 x 14 heads: 59 MB).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..cpu import checked_matmul_library, configure_session, integer_gemm, matmul_library
from ..manifest import ExportError, Manifest, check_graph_shapes
from .exported import ExportedBackend

_DEVICE_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_TENSOR_DTYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16)}
PREFILL_CHUNK_CPU = 256
_GQA_NO_FLASH = "ORT_GQA_DISABLE_FLASH_ATTENTION"  # read by ONNX Runtime's CPU GQA kernel when it is constructed


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("the onnxruntime backend needs ONNX Runtime: pip install onnxruntime "
                          "(or onnxruntime-gpu for CUDA)") from None
    return onnxruntime


class OnnxRuntimeBackend(ExportedBackend):
    def __init__(self, export_dir, manifest: Manifest, device: str = "cpu", num_threads: int | None = None,
                 max_seq: int | None = None, profile_prefix: str | None = None, edgevl_ops: bool | None = None):
        """profile_prefix: run the decoder under ONNX Runtime's profiler, its JSON written under this prefix by
        `self.decoder.end_profiling()` (`python -m benchmarks profile`).
        edgevl_ops: the decoder graph. None: the one edgevl.cpu takes for this CPU and precision; True: the export's
        decoder_avx2.onnx, on edgevl's Int8MatMul / Int4MatMul and GroupQueryAttention (an error where the export has
        none or this CPU cannot run them); False: decoder.onnx, on ONNX Runtime's ops. Both compute the same results
        (int8 prefill bit for bit; decode steps and int4 to float rounding); `python -m benchmarks decoders` times one
        against the other."""
        ort = _ort()
        export_dir = Path(export_dir)
        if device not in _DEVICE_PROVIDERS:
            raise ValueError(f"device={device!r}: expected one of {tuple(_DEVICE_PROVIDERS)}")
        provider = _DEVICE_PROVIDERS[device]
        if provider not in ort.get_available_providers():
            raise RuntimeError(f"device={device!r} needs {provider}, but this onnxruntime has "
                               f"{ort.get_available_providers()} (install onnxruntime-gpu for CUDA)")
        super().__init__(export_dir, manifest, manifest.limits, max_seq, "this export was made", "re-export")
        self.device = device
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads or 0  # 0: one per physical core
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.integer_gemm = None
        if device == "cpu" and "int8" in (manifest.precision.vision, manifest.precision.decoder):
            self.integer_gemm = integer_gemm()
            if not self.integer_gemm.exact:
                raise RuntimeError(f"{export_dir}: this is an int8 export, and ONNX Runtime {ort.__version__} cannot "
                                   f"compute its integer products exactly on this CPU ({self.integer_gemm.describe()})"
                                   "; use an fp32 export")
            configure_session(options)
        # The graphs this backend runs, each on edgevl's ops (kernels/ort_ops.c) where edgevl.cpu takes them for this
        # CPU and precision and the export carries them. The decoder: decoder_avx2.onnx (x86 without VNNI, AVX-512
        # VNNI, AMX), the same results, faster. The vision: vision_amx.onnx (AMX), attention in bf16, faster.
        gemm = self.integer_gemm
        self.decoder_graph, self.vision_graph = manifest.graphs.decoder, manifest.graphs.vision
        if edgevl_ops:
            if device != "cpu" or not manifest.graphs.decoder_avx2:
                raise ValueError(f"edgevl_ops=True: {export_dir} has no decoder graph on edgevl's ops for {device} "
                                 "(int8 and int4 exports carry decoder_avx2.onnx, for the CPU)")
            self.decoder_graph = manifest.graphs.decoder_avx2
        elif (edgevl_ops is None and gemm is not None and manifest.graphs.decoder_avx2
              and manifest.precision.decoder in gemm.edgevl_decoders):
            self.decoder_graph = manifest.graphs.decoder_avx2
        if gemm is not None and gemm.vision_attention and manifest.graphs.vision_amx:
            self.vision_graph = manifest.graphs.vision_amx
        if (self.decoder_graph, self.vision_graph) != (manifest.graphs.decoder, manifest.graphs.vision):
            # once for both sessions: these options refuse a second registration of the domain
            options.register_custom_ops_library(str(checked_matmul_library() if edgevl_ops else matmul_library()))
        self.vision = _session(ort, export_dir / self.vision_graph, options, provider)
        if profile_prefix is not None:
            options.enable_profiling, options.profile_file_prefix = True, profile_prefix
        with _plain_gqa_kernel(device == "cpu"):
            self.decoder = _session(ort, export_dir / self.decoder_graph, options, provider)
        check_graph_shapes(export_dir, manifest, {kind: {t.name: t.shape for t in s.get_inputs() + s.get_outputs()}
                                                  for kind, s in (("vision", self.vision), ("decoder", self.decoder))})
        # Positions per prefill run (None: the whole prompt in one). GPU prefill is left in one run: not measured.
        self.prefill_chunk = PREFILL_CHUNK_CPU if device == "cpu" else None
        # Tiles per vision run: on CPU one at a time (7 tiles of the InternVL2-1B shape: int8 8.7 s one by one
        # against 10.6 s in one batch, fp32 19.5 against 21.7 s; the batch's activations outgrow the cache).
        self.vision_batch = 1 if device == "cpu" else self.max_tiles
        spec = manifest.spec.decoder
        self._kv_shape = (1, spec.num_kv_heads, 0, spec.head_dim)
        self._kv_dtype = np.dtype(manifest.kv_cache.dtype)
        self._embeds_dtype = _TENSOR_DTYPES[self.decoder.get_inputs()[0].type]  # fp32 even in fp16 graphs
        self._shared_kv = manifest.kv_cache.layout == "shared"
        # LongRoPE picks its factor set from the furthest position of each run, so a prompt that crosses
        # original_max_position_embeddings is prefilled in one run, rotating its keys as the reference's one call does.
        self._one_run_beyond = spec.long_rope.original_max_position_embeddings if spec.long_rope else None
        names = [i.name for i in self.decoder.get_inputs()]
        self._past_names = [n for n in names if n.startswith("past_key_values.")]
        self._present_names = [n.replace("past_key_values.", "present.") for n in self._past_names]
        self._past = []

    @property
    def vision_input_dtype(self) -> np.dtype:
        kind = self.vision.get_inputs()[0].type
        if kind not in _TENSOR_DTYPES:
            raise ValueError(f"the vision graph takes {kind} pixel values; expected one of {sorted(_TENSOR_DTYPES)}")
        return _TENSOR_DTYPES[kind]

    def _encode(self, tiles: np.ndarray) -> np.ndarray:
        return self.vision.run(None, {"pixel_values": tiles})[0]

    def _encode_device(self, ptr: int, tiles: int, dtype) -> np.ndarray:
        """Pixel values already in this backend's device memory, bound in place through IOBinding. On device='cpu'
        the address is host memory (the tests' stand-in for a GPU)."""
        dtype = self._check_device_dtype(dtype)
        size = self.vision.get_inputs()[0].shape[-1]
        binding = self.vision.io_binding()
        binding.bind_input("pixel_values", self.device, 0, dtype, (tiles, 3, size, size), ptr)
        binding.bind_output(self.vision.get_outputs()[0].name, "cpu")
        self.vision.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def _prefill_chunk(self, n: int) -> int:
        return n if self._one_run_beyond is not None and n > self._one_run_beyond else super()._prefill_chunk(n)

    def _reset(self) -> None:
        ort = _ort()
        if not self._shared_kv:
            self._past = [ort.OrtValue.ortvalue_from_shape_and_type(self._kv_shape, self._kv_dtype, self.device, 0)
                          for _ in self._past_names]
        elif not self._past:  # allocated and bound once: rows past the valid length are never read
            shape = self._kv_shape[:2] + (self.max_seq,) + self._kv_shape[3:]
            self._past = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self._kv_dtype, self.device, 0)
                          for _ in self._past_names]
            self._binding = self.decoder.io_binding()
            for past, present, value in zip(self._past_names, self._present_names, self._past):
                self._binding.bind_ortvalue_input(past, value)
                self._binding.bind_ortvalue_output(present, value)
            logits = self.decoder.get_outputs()[0]  # [1, 1, vocab]: the last position's only
            self._logits = ort.OrtValue.ortvalue_from_shape_and_type(logits.shape, _TENSOR_DTYPES[logits.type],
                                                                     "cpu", 0)
            self._binding.bind_ortvalue_output("logits", self._logits)

    def _step(self, embeds: np.ndarray) -> np.ndarray:
        n = len(embeds)
        # Shared layout: the KV and logits bindings never change, only the step's embeddings and positions.
        binding = self._binding if self._shared_kv else self.decoder.io_binding()
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds[None], dtype=self._embeds_dtype))
        binding.bind_cpu_input("position_ids", np.arange(self._pos, self._pos + n, dtype=np.int64)[None])
        if not self._shared_kv:
            binding.bind_output("logits", "cpu")  # first: get_outputs() follows the binding order
            for past, present, value in zip(self._past_names, self._present_names, self._past):
                binding.bind_ortvalue_input(past, value)
                binding.bind_output(present, self.device)
        self.decoder.run_with_iobinding(binding)
        self._pos += n
        if self._shared_kv:
            logits = self._logits
        else:
            logits, *self._past = binding.get_outputs()
        # A copy: OrtValue.numpy() is a view, and the shared layout writes every step into the same logits buffer.
        return np.array(logits.numpy()[0, -1], dtype=np.float32)


def _session(ort, graph: Path, options, provider: str):
    try:
        return ort.InferenceSession(str(graph), options, providers=[provider])
    except Exception as e:  # ONNX Runtime's own classes (InvalidProtobuf, Fail, ...): a graph it cannot load
        raise ExportError(f"{graph}: ONNX Runtime {ort.__version__} cannot load it ({' '.join(str(e).split())}); "
                          "re-export it with this edgevl") from None


@contextmanager
def _plain_gqa_kernel(enabled: bool):
    """Set ORT_GQA_DISABLE_FLASH_ATTENTION=1 while the decoder session is built (its kernels read it then), and
    restore the environment after, so other sessions in the process are untouched. A value the user set wins."""
    if not enabled or _GQA_NO_FLASH in os.environ:
        yield
        return
    os.environ[_GQA_NO_FLASH] = "1"
    try:
        yield
    finally:
        del os.environ[_GQA_NO_FLASH]
