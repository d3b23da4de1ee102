"""Precision is decided in the ONNX graph, not by builder flags: TensorRT builds every edgevl engine strongly
typed (TensorRT 11 removed the weak-typing flags BuilderFlag.FP16/INT8; on 10.x strong typing is what kept
InternViT from silently diverging, TensorRT-LLM issue 3223). So the fp32 export is rewritten here to fp16 with
fp32 islands, and the decoder's MatMul weights optionally to int8 or int4 weight-only DequantizeLinear.

Plain onnx + numpy: runs (and is tested against ONNX Runtime CPU) on machines without a GPU.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgevl.precisions import INT4

from ..quantizer import symmetric_weights

# Overflow-prone or precision-critical ops kept in fp32: normalisations (LayerNorm; the decomposed RMSNorm's
# Pow -> ReduceMean -> Sqrt -> Reciprocal), softmax, and the ops that feed them.
FP32_OP_TYPES = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Reciprocal")
# The decoder's graph inputs that stay fp32 (the host hands over float32 embeddings); the KV cache is fp16.
DECODER_FP32_IO = ("inputs_embeds",)
WEIGHT_ONLY_MIN_ELEMENTS = 1 << 12  # smaller MatMul weights (none in a real model) are not worth quantizing
WEIGHT_ONLY_BITS = {"int8-weight-only": 8, "int4-weight-only": 4}  # decoder graph precision -> weight bits


def _constant_names(graph) -> set[str]:
    names = {t.name for t in graph.initializer}
    names |= {out for n in graph.node if n.op_type == "Constant" for out in n.output}
    return names


def fp32_node_names(model) -> list[str]:
    """Nodes that stay fp32 in the fp16 graph: every node of FP32_OP_TYPES, plus each Add whose operands are
    both activations (residual adds and attention-mask adds, the sites that overflow fp16 in InternViT) or that
    reads an fp32 node (the RMSNorm epsilon add between ReduceMean and Sqrt). Bias adds (one operand a
    constant, the other a MatMul output) stay fp16."""
    graph = model.graph
    constants = _constant_names(graph)
    producer = {out: n for n in graph.node for out in n.output}
    blocked = [n.name for n in graph.node if n.op_type in FP32_OP_TYPES]
    blocked_set = set(blocked)
    for node in graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        activations = [i for i in node.input if i not in constants]
        reads_fp32 = any(producer.get(i) is not None and producer[i].name in blocked_set for i in node.input)
        if len(activations) == 2 or reads_fp32:
            blocked.append(node.name)
    return blocked


def _name_nodes(model) -> None:
    """The fp16 converter blocks nodes by name; the dynamo exporter leaves some unnamed."""
    seen = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def to_mixed_fp16(model, keep_fp32_io=()):
    """fp32 ModelProto -> fp16 with fp32 islands (fp32_node_names); graph inputs/outputs become fp16 except
    `keep_fp32_io`. Q/DQ nodes (an int8 vision graph) keep their fp32 scales: opset < 19 has no fp16 scale."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    _name_nodes(model)
    blocked = fp32_node_names(model)
    op_block = list(FP32_OP_TYPES) + ["QuantizeLinear", "DequantizeLinear"]
    model = convert_float_to_float16(model, keep_io_types=list(keep_fp32_io), op_block_list=op_block,
                                     node_block_list=blocked, disable_shape_infer=True)
    # The exporter's value_info still carries some pre-conversion types; stale types mislead parsers, and
    # TensorRT and ONNX Runtime infer them from the graph anyway.
    del model.graph.value_info[:]
    return model


# INT4 blocks run along K (the MatMul's reduction axis, axis 0 of a [K, N] weight): TensorRT's DequantizeLayer
# takes block quantization on one of the last two axes (IDequantizeLayer docs, TensorRT 10.x) and its ONNX parser
# infers the block from the scale's shape (onnx-tensorrt 10.0 QuantDequantLinearHelper). The recipes' 128
# (edgevl.precisions.INT4) divides every K of InternVL2-1B/2B/4B (896, 2048, 3072, 4864, 8192); a K it does not
# divide (tiny test models) takes the largest power of two below it that does.
INT4_MIN_BLOCK_SIZE = 16
# DequantizeLinear's fp16 scales need opset 19; INT4 inputs and blocked scales (block_size) need opset 21.
WEIGHT_ONLY_OPSET = {8: 19, 4: 21}


def int4_block_size(k: int, preferred: int = INT4.block_size) -> int | None:
    """The block length along K for an INT4 weight with K rows, or None when no block of at least
    INT4_MIN_BLOCK_SIZE divides K (such a weight stays fp16)."""
    block = preferred
    while block >= INT4_MIN_BLOCK_SIZE:
        if k % block == 0:
            return block
        block //= 2
    return None


def _quantized_weight(w: np.ndarray, bits: int, block_size: int):
    """Symmetric (zero point 0, TensorRT's requirement) int8 per output column, or int4 per (block of K, column):
    returns the integer weight, its fp16 scale (shape [N] or [K / block, N]) and the DequantizeLinear attributes."""
    q, scale = symmetric_weights(w, bits, None if bits == 8 else block_size)
    attributes = {"axis": 1} if bits == 8 else {"axis": 0, "block_size": block_size}
    return q, scale.astype(np.float16), attributes


def _int_tensor(name: str, q: np.ndarray, bits: int):
    from onnx import TensorProto, helper, numpy_helper

    if bits == 8:
        return numpy_helper.from_array(q, name)
    # ONNX INT4: two values per byte, the first in the low nibble (onnx's own packing order).
    nibbles = (q.ravel().astype(np.uint8) & 0x0F)
    if len(nibbles) % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    packed = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)
    return helper.make_tensor(name, TensorProto.INT4, q.shape, packed.tobytes(), raw=True)


def quantize_weights(model, bits: int, block_size: int = INT4.block_size,
                     min_elements: int = WEIGHT_ONLY_MIN_ELEMENTS) -> int:
    """Weight-only int8 or int4 for the fp16 decoder: every MatMul whose B is an fp16 [K, N] initializer (used
    once) becomes DequantizeLinear(intN B, fp16 scale, zero point 0) -> MatMul. int8: one scale per output column
    (axis 1). int4: one scale per block of `block_size` rows of K per column (int4_block_size), packed ONNX INT4;
    TensorRT also needs N even for INT4 (its packing), so a weight with odd N (an odd vocabulary's lm_head) stays
    fp16. The default-domain opset is raised to WEIGHT_ONLY_OPSET[bits] (no op the exporter emits at 18 changes
    meaning up to 21: the 19-21 revisions of the ops it uses only add types). Returns the number quantized."""
    import onnx
    from onnx import helper, numpy_helper

    if bits not in WEIGHT_ONLY_OPSET:
        raise ValueError(f"bits={bits}: weight-only quantization is int8 or int4")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    new_nodes, count = [], 0
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        block = None
        if weight is not None and bits == 4 and len(weight.dims) == 2 and weight.dims[1] % 2 == 0:
            block = int4_block_size(weight.dims[0], block_size)
        if (weight is None or len(weight.dims) != 2 or uses[weight.name] != 1
                or weight.data_type != onnx.TensorProto.FLOAT16 or np.prod(weight.dims) < min_elements
                or (bits == 4 and block is None)):
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(weight).astype(np.float32)
        q, scale, attributes = _quantized_weight(w, bits, block)
        graph.initializer.remove(weight)
        graph.initializer.extend([_int_tensor(f"{weight.name}_int{bits}", q, bits),
                                  numpy_helper.from_array(scale, f"{weight.name}_scale"),
                                  _int_tensor(f"{weight.name}_zero", np.zeros(scale.shape, np.int8), bits)])
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{weight.name}_int{bits}", f"{weight.name}_scale",
                                                               f"{weight.name}_zero"], [weight.name],
                                          name=f"{node.name}_dq_weight", **attributes))
        new_nodes.append(node)
        count += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < WEIGHT_ONLY_OPSET[bits]:
            opset.version = WEIGHT_ONLY_OPSET[bits]
    return count


def write_precision_graph(src: Path, dst: Path, kind: str, precision: str) -> int:
    """Write the graph TensorRT parses for `kind` ("vision"/"decoder") at `precision`; returns how many weights
    were quantized weight-only (0 unless an int8/int4 weight-only decoder). Vision inputs/outputs stay fp32 (host
    numpy in and out; the cast is one kernel); the decoder keeps inputs_embeds fp32 and moves logits and KV to
    fp16."""
    import onnx

    model = onnx.load(str(src))
    if kind == "vision" and precision == "int8":
        # The Q/DQ graph as calibrated: TensorRT runs its Conv/MatMul in int8 and the rest (norms, softmax,
        # GELU, residuals) in fp32. An fp16 rewrite would put Casts between DQ and MatMul (opset 18 has no fp16
        # scales), which TensorRT's Q/DQ fusion is not documented to see through.
        _save(model, Path(dst))
        return 0
    keep = ("pixel_values", "image_embeds") if kind == "vision" else DECODER_FP32_IO
    model = to_mixed_fp16(model, keep)
    bits = WEIGHT_ONLY_BITS.get(precision)
    quantized = quantize_weights(model, bits) if bits else 0
    _save(model, Path(dst))
    return quantized


def _save(model, dst: Path) -> None:
    import onnx

    large = sum(t.ByteSize() for t in model.graph.initializer) > (1 << 31) - (1 << 28)  # protobuf's 2 GB limit
    onnx.save(model, str(dst), save_as_external_data=large, location=f"{dst.name}.data" if large else None)
