"""ONNX operators TensorRT's ONNX parser supports, as data, and the check every exported graph must pass.

Source: onnx/onnx-tensorrt docs/operators.md at the 10.1 GA release (the newest release branch in our reference
snapshot; operator support only grows, so this is also safe for 10.3 on JetPack 6 and 10.x/11.x desktops). That
release documents opsets 9-20 (10.15's documents 9-24). Entries marked "Y"; restrictions that matter to us: Q/DQ
zero points must be 0 (symmetric), LayerNormalization only its first output, ScatterND without `reduction`.

INT4 (weight-only decoders): DequantizeLinear takes INT4 since TensorRT 10.0 (onnx-tensorrt 10.0 EA changelog:
"Added support for INT4 quantization"). Its importer (QuantDequantLinearHelper, 10.0/10.1) reads block
quantization from the scale's shape, not from opset 21's `block_size` attribute: the scale has the input's rank and
exactly one blocked axis, the block must divide that axis, and an INT4 tensor's last dimension must be even; the
IDequantizeLayer docs add that the blocked axis is one of the last two. ONNX only has INT4 and blocked
DequantizeLinear from opset 21, so such graphs import opset 21: the 10.0/10.1 parser checks only a lower opset
bound (ModelImporter::importModel), and opset 21 revised, besides Q/DQ, only ops whose change was adding the
INT4/UINT4 types (OPSET_21_TYPES_ONLY); any other op revised at 21 (GroupNormalization changed meaning) is refused.
"""
from __future__ import annotations

TRT_MAX_OPSET = 20
TRT_MAX_INT4_OPSET = 21

TRT_SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear
Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid
HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization
Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign
Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile
TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# ONNX opset 21 changelog: these ops' opset-21 versions only added INT4/UINT4 (and, for Q/DQ, blocked scales).
OPSET_21_TYPES_ONLY = frozenset("""
Cast CastLike Constant ConstantOfShape DequantizeLinear Flatten Identity If Loop Pad QuantizeLinear Reshape Scan
Shape Size Squeeze Transpose Unsqueeze
""".split())


def trt_incompatibilities(model) -> list[str]:
    """Why TensorRT's parser would reject this onnx.ModelProto; empty when it would not."""
    import onnx

    problems = []
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    has_int4 = any(t.data_type == onnx.TensorProto.INT4 for t in model.graph.initializer)
    if opset > (TRT_MAX_INT4_OPSET if has_int4 else TRT_MAX_OPSET):
        problems.append(f"opset {opset} > {TRT_MAX_INT4_OPSET if has_int4 else TRT_MAX_OPSET}"
                        + ("" if has_int4 else " (opset 21 only for INT4 weight-only graphs)"))
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{node.op_type} (domain {node.domain}) in node {node.name}")
        elif node.op_type not in TRT_SUPPORTED_OPS:
            problems.append(f"{node.op_type} in node {node.name}")
        elif (opset > TRT_MAX_OPSET and node.op_type not in OPSET_21_TYPES_ONLY
              and onnx.defs.get_schema(node.op_type, opset).since_version > TRT_MAX_OPSET):
            problems.append(f"{node.op_type} in node {node.name} changed meaning at opset {opset}")
    problems += _int4_dequantize_problems(model)
    return sorted(set(problems))


def _int4_dequantize_problems(model) -> list[str]:
    """The importer's INT4 DequantizeLinear restrictions (see the module docstring) on constant weights."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    problems = []
    for node in model.graph.node:
        data = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if data is None or data.data_type != onnx.TensorProto.INT4:
            continue
        dims, where = list(data.dims), f"INT4 DequantizeLinear {node.name}"
        scale = inits.get(node.input[1])
        zero = inits.get(node.input[2]) if len(node.input) > 2 else None
        if scale is None or len(scale.dims) != len(dims):
            problems.append(f"{where}: the scale must be a constant of the input's rank (block quantization)")
            continue
        blocked = [axis for axis, (d, s) in enumerate(zip(dims, scale.dims)) if d != s]
        if len(blocked) > 1 or any(d % s for d, s in zip(dims, scale.dims)) or (
                blocked and blocked[0] < len(dims) - 2):
            problems.append(f"{where}: scale {list(scale.dims)} for {dims} is not one whole block per scale along "
                            "one of the last two axes")
        if dims[-1] % 2:
            problems.append(f"{where}: odd last dimension {dims[-1]} (TensorRT packs INT4 in pairs)")
        if zero is not None and np.any(numpy_helper.to_array(zero)):
            problems.append(f"{where}: zero point must be 0 (TensorRT quantization is symmetric)")
    return problems
