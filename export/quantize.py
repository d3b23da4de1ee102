"""Precisions for CPU edge boxes: static int8 Q/DQ for the vision graph (calibrated on images); for the decoder
int8 weights with per-token int8 activations (export/cpu_graph.py) or int4 block-quantized weights (MatMulNBits);
and the drift each costs against fp32."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edgevl.preprocess import TilingConfig, preprocess_image
from edgevl.synthetic import synthetic_image

from .graphs import EXTERNAL_DATA_BYTES

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# int4 weight block along K. 128 (GPTQ/AWQ's usual group size) rather than onnxruntime-genai's CPU default of 32:
# on the 2-core Xeon, Qwen2-0.5B's decode step at 700 past tokens takes 19.7 ms against 23.8 ms and a 662-token
# prefill 1.9 s against 2.5 s (fewer scales to read and apply); the drift against fp32 is recorded per export.
# Every weight keeps at least MIN_BLOCKS blocks along K: narrower models (the tests' tiny ones) use SMALL_BLOCK_SIZE.
BLOCK_SIZE, SMALL_BLOCK_SIZE, MIN_BLOCKS = 128, 32, 4


# ONNX Runtime's MinMax calibrator keeps every intermediate tensor of every calibration tile until the end
# (~0.5 GB per InternViT-300M tile; its CalibMaxIntermediateOutputs option drops data instead of merging it in
# onnxruntime 1.32), so the tile count bounds the export's memory: 16 tiles ~ 9 GB.
CALIBRATION_TILES = 16


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


def quantize_vision_int8(fp32_path: Path, out_path: Path, tiles: np.ndarray) -> None:
    """Static int8 Q/DQ on the patch Conv and the weight MatMuls; attention (Q x K^T, softmax, x V), LayerNorm,
    GELU and residual adds stay fp32. Symmetric activations (zero point 0) because TensorRT's explicit
    quantization requires it. Attention stays fp32 because quantizing its MatMuls makes ONNX Runtime fuse
    DQ -> Softmax -> Q into QLinearSoftmax, which alone took 0.44 s of a 1.63 s InternViT-300M tile on the
    2-core Xeon (1.37 s without it), and int8 softmax probabilities cost accuracy besides."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{"pixel_values": tiles[i:i + 1]} for i in range(len(tiles))])

        def get_next(self):
            return next(self._it, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime.quantization logs "consider pre-processing" on the root logger
    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    activation_matmuls = [n.name for n in graph.node if n.op_type == "MatMul" and not set(n.input) & weights]
    quantize_static(str(fp32_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["Conv", "MatMul"], nodes_to_exclude=activation_matmuls, per_channel=True,
                    use_external_data_format=_needs_external_data(fp32_path, bytes_per_weight=1),
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    root.setLevel(level)


def quantize_decoder_weights(fp32_path: Path, out_path: Path, bits: int, decoder_spec: dict,
                             max_seq: int) -> tuple[str, bool]:
    """The decoder for ONNX Runtime on CPU: RMSNorm fused, attention fused into GroupQueryAttention
    (cpu_graph.fuse_attention: every family, Phi-3's LongRoPE included), then the weights quantized. bits=8: int8
    weights per output channel with activations quantized per token (cpu_graph.quantize_matmuls_per_token: integer
    GEMM, fast prefill). bits=4: int4 weights in symmetric blocks (matmulnbits_block_size; MatMulNBits, activations
    quantized to int8 per block, accuracy_level 4): the fastest decode, a slower prefill than int8's. Returns the
    scheme in words and whether attention was fused (the KV cache is then one shared buffer per tensor: the
    manifest's "shared" layout; a decoder graph without the exported attention shape keeps "concat")."""
    import onnx

    from .cpu_graph import fuse_attention, fuse_rms_norm, quantize_matmuls_per_token

    model = onnx.load(str(fp32_path))
    fuse_rms_norm(model)
    fused = fuse_attention(model, decoder_spec, max_seq) > 0
    if bits == 8:
        quantize_matmuls_per_token(model)
        onnx.save(model, str(out_path), save_as_external_data=_needs_external_data(fp32_path, 1),
                  location=out_path.name + ".data")
        return "int8 weights per channel, int8 activations per token", fused
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    block = matmulnbits_block_size(decoder_spec)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out_path),
                                       use_external_data_format=_needs_external_data(fp32_path, bits / 8))
    return f"int4 weights in blocks of {block}", fused


def matmulnbits_block_size(decoder_spec: dict) -> int:
    """BLOCK_SIZE when every weight's K (hidden and intermediate size) holds MIN_BLOCKS of it, else SMALL_BLOCK_SIZE."""
    narrowest = min(decoder_spec["hidden_size"], decoder_spec["intermediate_size"])
    return BLOCK_SIZE if narrowest >= MIN_BLOCKS * BLOCK_SIZE else SMALL_BLOCK_SIZE


def _needs_external_data(fp32_path: Path, bytes_per_weight: float) -> bool:
    """Whether the quantized graph would pass protobuf's 2 GB limit (with margin), judged from the fp32 one."""
    fp32_bytes = sum(p.stat().st_size for p in (fp32_path, fp32_path.with_name(fp32_path.name + ".data"))
                     if p.exists())
    return fp32_bytes * bytes_per_weight / 4 > EXTERNAL_DATA_BYTES
