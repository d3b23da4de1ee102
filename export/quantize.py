"""Precisions for CPU edge boxes: static int8 Q/DQ for the vision graph (calibrated on images); for the decoder
int8 weights with per-token int8 activations (export/cpu_graph.py) or int4 block-quantized weights (MatMulNBits);
and the drift each costs against fp32."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edgevl.manifest import EXTERNAL_DATA_BYTES
from edgevl.precisions import WeightScheme
from edgevl.preprocess import TilingConfig, preprocess_image
from edgevl.synthetic import synthetic_image

from .initializers import Initializers
from .memory import progress, release_memory

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# MatMulNBits' int4 block along K is the recipe's (edgevl.precisions.INT4), as long as every weight keeps at least
# MIN_BLOCKS blocks along K; narrower models (the tests' tiny ones) use SMALL_BLOCK_SIZE.
SMALL_BLOCK_SIZE, MIN_BLOCKS = 32, 4
CALIBRATION_TILES = 16  # tiles the vision graph's activation ranges are measured on, one run each


def calibration_tiles(calib_images: Path | None, tiling: TilingConfig,
                      max_tiles: int = CALIBRATION_TILES) -> np.ndarray:
    """Tiles to calibrate activations on: the user's images, else a generated set of structured synthetic
    images of several sizes and aspect ratios (no data ships with edgevl)."""
    if calib_images is not None:
        images = calibration_images(calib_images)
    else:
        sizes = [(448, 448), (800, 600), (600, 900), (1280, 720), (500, 1500)]
        images = [synthetic_image(w, h, seed=100 + i) for i, (w, h) in enumerate(sizes)]
    tiles = np.concatenate([preprocess_image(im, tiling) for im in images])
    return tiles[np.linspace(0, len(tiles) - 1, min(max_tiles, len(tiles))).astype(int)]


def calibration_images(calib_images) -> list[Path]:
    """The image files of a calibration directory; ValueError naming it when there are none."""
    folder = Path(calib_images)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a directory of calibration images")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) to calibrate on")
    return paths


def quantize_vision_int8(fp32_path: Path, out_path: Path, tiles: np.ndarray, log=print) -> None:
    """Static int8 Q/DQ on the patch Conv and the weight MatMuls; attention (Q x K^T, softmax, x V), LayerNorm,
    GELU and residual adds stay fp32. Symmetric activations (zero point 0) because TensorRT's explicit
    quantization requires it. Attention stays fp32 because quantizing its MatMuls makes ONNX Runtime fuse
    DQ -> Softmax -> Q into QLinearSoftmax, which alone took 0.44 s of a 1.63 s InternViT-300M tile on the
    2-core Xeon (1.37 s without it), and int8 softmax probabilities cost accuracy besides. The activation ranges
    come from calibrate_vision, handed to quantize_static as its calibration cache."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime.quantization logs "consider pre-processing" on the root logger
    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    activation_matmuls = [n.name for n in graph.node if n.op_type == "MatMul" and not set(n.input) & weights]
    external = _needs_external_data(fp32_path, bytes_per_weight=1)
    with tempfile.TemporaryDirectory(prefix="edgevl-calibration-", dir=out_path.parent) as scratch:
        cache = Path(scratch) / "ranges.json"
        save_tensors_data(calibrate_vision(fp32_path, tiles, Path(scratch), log), cache)
        release_memory()
        quantize_static(str(fp32_path), str(out_path), None, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=VISION_QUANTIZED_OPS, nodes_to_exclude=activation_matmuls,
                        per_channel=True, use_external_data_format=external, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibration_cache_path=cache,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    root.setLevel(level)


VISION_QUANTIZED_OPS = ["Conv", "MatMul"]


def calibrate_vision(fp32_path: Path, tiles: np.ndarray, scratch: Path, log=print):
    """The activation ranges quantize_static computes for VISION_QUANTIZED_OPS (ONNX Runtime's MinMax calibrator,
    not symmetric: ActivationSymmetric applies later, in the quantizer), one tile per run, in a session that
    frees each tensor once reduced. The calibrator appends a ReduceMin/ReduceMax pair per calibrated tensor whose
    outputs nothing consumes, and the default execution order runs those pairs late, keeping every calibrated
    tensor of a run alive: ~5 GB per InternViT-300M tile (quantize_static's own session, with its memory arena
    and memory pattern, then grows past 10 GB). The priority-based order runs each pair as soon as its tensor
    exists; the nodes and kernels are the same, and so are the ranges (checked equal on InternViT-300M)."""
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    class LeanMinMaxCalibrater(MinMaxCalibrater):
        def create_inference_session(self):
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as the base class
            options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
            options.enable_cpu_mem_arena = False
            options.enable_mem_pattern = False
            self.infer_session = ort.InferenceSession(self.augmented_model_path, options,
                                                      providers=self.execution_providers)

    class Reader:
        def __init__(self):
            self._it = progress(({"pixel_values": tiles[i:i + 1]} for i in range(len(tiles))), len(tiles),
                                "vision calibration tiles", log)

        def get_next(self):
            release_memory()  # the previous run's intermediates, freed by ONNX Runtime's threads' malloc arenas
            return next(self._it, None)

    # External data: the session then reads the weights straight from the file, not from a parsed 1.2 GB graph.
    calibrator = LeanMinMaxCalibrater(fp32_path, VISION_QUANTIZED_OPS, str(scratch / "augmented.onnx"),
                                      use_external_data_format=True)
    calibrator.augment_graph()
    calibrator.create_inference_session()
    calibrator.model = None  # the loaded graph: the session holds its own copy of the weights
    release_memory()
    calibrator.collect_data(Reader())
    return calibrator.compute_data()


def quantize_decoder_weights(fp32_path: Path, out_path: Path, weights: WeightScheme, decoder_spec: dict,
                             max_seq: int, log=print) -> tuple[str, bool]:
    """The decoder for ONNX Runtime on CPU: RMSNorm fused, attention fused into GroupQueryAttention
    (cpu_graph.fuse_attention: every family, Phi-3's LongRoPE included), then the weights quantized. 8 bits: int8
    weights per output channel with activations quantized per token (cpu_graph.quantize_matmuls_per_token: integer
    GEMM, fast prefill). 4 bits: int4 weights in symmetric blocks (matmulnbits_block_size; MatMulNBits, activations
    quantized to int8 per block, accuracy_level 4): the fastest decode, a slower prefill than int8's. Returns the
    scheme in words and whether attention was fused (the KV cache is then one shared buffer per tensor: the
    manifest's "shared" layout; a decoder graph without the exported attention shape keeps "concat"). Tensor by
    tensor (export/initializers.py): the fp32 weights are read one at a time from fp32_path's external data, the
    quantized ones written out as they are made."""
    import onnx

    from .cpu_graph import fuse_attention, fuse_rms_norm, quantize_matmuls_per_token

    model = onnx.load(str(fp32_path), load_external_data=False)
    bits = weights.bits
    # Always a data file, which write_avx2_decoder's graph then shares.
    with Initializers(fp32_path.parent, out_path.with_name(out_path.name + ".data")) as data:
        fuse_rms_norm(model, data)
        fused = fuse_attention(model, decoder_spec, max_seq, data) > 0
        if bits == 8:
            quantize_matmuls_per_token(model, data, log)
            scheme = "int8 weights per channel, int8 activations per token"
        else:
            block = matmulnbits_block_size(decoder_spec, weights.block_size)
            _quantize_matmuls_nbits(model, data, bits, block, log)
            scheme = f"int4 weights in blocks of {block}"
        data.finish(model.graph)
    onnx.save(model, str(out_path))
    return scheme, fused


def write_avx2_decoder(decoder_path: Path, out_path: Path) -> str:
    """The int8 or int4 decoder graph on edgevl's ops beside it, reading the same data file: each weight matmul as
    Int8MatMul / Int4MatMul (cpu_graph.use_edgevl_int8_matmul, use_edgevl_int4_matmul) with the bias, SwiGLU and
    residual after it folded in (cpu_graph.fuse_matmul_epilogues), and each attention as edgevl's GroupQueryAttention
    (cpu_graph.use_edgevl_attention). Returns what it replaced, in words."""
    import onnx

    from .cpu_graph import fuse_matmul_epilogues, use_edgevl_attention, use_edgevl_int4_matmul, use_edgevl_int8_matmul

    model = onnx.load(str(decoder_path), load_external_data=False)
    replaced, op = use_edgevl_int8_matmul(model), "Int8MatMul"
    if not replaced:
        replaced, op = use_edgevl_int4_matmul(model), "Int4MatMul"
    folded = fuse_matmul_epilogues(model, Initializers(decoder_path.parent))
    layers = use_edgevl_attention(model)
    onnx.save(model, str(out_path))
    return (f"{replaced} matmuls on edgevl's {op} ({folded} nodes after them folded in), {layers} attention layers "
            "on its GroupQueryAttention")


def fuse_cpu_vision(vision_path: Path) -> str:
    """The calibrated vision graph rewritten in place for ONNX Runtime, where an int8 export's vision.onnx runs
    (TensorRT builds start from an fp32 export and calibrate their own): each weight MatMul's output left fp32
    (cpu_graph.drop_matmul_output_requantization), each attention as MultiHeadAttention and each GELU as Gelu
    (fuse_vision_attention, fuse_gelu). Its weights go to a data file beside it, which write_amx_vision's graph then
    shares. Returns what it changed, in words."""
    import onnx

    from .cpu_graph import drop_matmul_output_requantization, fuse_gelu, fuse_vision_attention

    model = onnx.load(str(vision_path))
    data = Initializers(vision_path.parent)
    outputs = drop_matmul_output_requantization(model, VISION_QUANTIZED_OPS)
    layers, gelus = fuse_vision_attention(model, data), fuse_gelu(model, data)
    onnx.save(model, str(vision_path), save_as_external_data=True, location=vision_path.name + ".data")
    return (f"{outputs} matmul outputs fp32, {layers} attention layers as MultiHeadAttention, {gelus} GELUs as "
            "Gelu")


def write_amx_vision(vision_path: Path, out_path: Path) -> str:
    """The int8 vision graph beside it, reading the same data file, with each MultiHeadAttention as edgevl's
    (cpu_graph.use_edgevl_attention): bf16 attention on AMX tiles, for the CPUs edgevl.cpu names. Returns what it
    replaced, in words."""
    import onnx

    from .cpu_graph import use_edgevl_attention

    model = onnx.load(str(vision_path), load_external_data=False)
    layers = use_edgevl_attention(model, "MultiHeadAttention")
    onnx.save(model, str(out_path))
    return f"{layers} attention layers on edgevl's MultiHeadAttention (bf16 on AMX tiles)"


def _quantize_matmuls_nbits(model, data: Initializers, bits: int, block_size: int, log) -> None:
    """MatMulNBitsQuantizer(model, bits, block_size, is_symmetric=True, accuracy_level=4).process() and its
    save's topological sort, one weight at a time: ONNX Runtime's own per-node quantizer gets each MatMul with a
    graph holding just that node's weight, and the packed weight and scales it makes go straight to `data`."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 DefaultWeightOnlyQuantizer)
    from onnxruntime.quantization.onnx_model import ONNXModel

    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, accuracy_level=4, bits=bits))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = []
    for node in progress(list(graph.node), len(graph.node), f"int{bits} weights", log):
        weight = inits.get(node.input[1]) if node.op_type in quantizer.config.op_types_to_quantize else None
        if weight is None:
            nodes.append(node)
            continue
        scratch = onnx.GraphProto()
        scratch.initializer.append(data.loaded(weight))
        nodes += quantizer.quantize(node, [scratch])
        for tensor in scratch.initializer[1:]:
            data.add(graph, tensor)
    del graph.node[:]
    graph.node.extend(nodes)
    wrapped = ONNXModel(model)
    wrapped.set_opset_import("com.microsoft", 1)
    wrapped.clean_initializers()
    wrapped.topological_sort()


def matmulnbits_block_size(decoder_spec: dict, preferred: int) -> int:
    """`preferred` when every weight's K (hidden and intermediate size) holds MIN_BLOCKS of it, else
    SMALL_BLOCK_SIZE."""
    narrowest = min(decoder_spec["hidden_size"], decoder_spec["intermediate_size"])
    return preferred if narrowest >= MIN_BLOCKS * preferred else SMALL_BLOCK_SIZE


def _needs_external_data(fp32_path: Path, bytes_per_weight: float) -> bool:
    """Whether the quantized graph would pass protobuf's 2 GB limit (with margin), judged from the fp32 one."""
    fp32_bytes = sum(p.stat().st_size for p in (fp32_path, fp32_path.with_name(fp32_path.name + ".data"))
                     if p.exists())
    return fp32_bytes * bytes_per_weight / 4 > EXTERNAL_DATA_BYTES
