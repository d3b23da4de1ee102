"""ONNX operators TensorRT's ONNX parser supports, as data, and the check every exported graph must pass.

Source: onnx/onnx-tensorrt docs/operators.md at the 10.1 GA release (the newest in our reference snapshot;
operator support only grows, so this is also safe for 10.3 on JetPack 6 and 10.x/11.x desktops). That release
parses opsets 9-20. Entries marked "Y"; restrictions that matter to us: Q/DQ zero points must be 0
(symmetric int8), LayerNormalization only its first output.
"""
from __future__ import annotations

TRT_MAX_OPSET = 20

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


def trt_incompatibilities(model) -> list[str]:
    """Why TensorRT's parser would reject this onnx.ModelProto; empty when it would not."""
    problems = []
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > TRT_MAX_OPSET:
            problems.append(f"opset {opset.version} > {TRT_MAX_OPSET}")
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{node.op_type} (domain {node.domain}) in node {node.name}")
        elif node.op_type not in TRT_SUPPORTED_OPS:
            problems.append(f"{node.op_type} in node {node.name}")
    return sorted(set(problems))
