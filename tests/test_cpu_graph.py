"""The CPU-only decoder rewrites (export/cpu_graph.py) against numpy on small graphs: per-token int8 matmuls
and the fused RMSNorm."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgevl.export.cpu_graph import fuse_rms_norm, quantize_matmuls_per_token

K, N = 128, 96


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _matmul_model(weight):
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", N])],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_per_token_int8_matmul_matches_numpy_quantization():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((K, N)).astype(np.float32)
    x = rng.standard_normal((1, 5, K)).astype(np.float32)
    model = _matmul_model(weight)
    assert quantize_matmuls_per_token(model) == 1
    assert {n.op_type for n in model.graph.node} >= {"MatMulIntegerToFloat", "QuantizeLinear"}
    # The scheme written out independently: symmetric int8 per output channel / per token, round half to even.
    w_scale = np.abs(weight).max(0) / 127
    x_scale = np.abs(x).max(-1, keepdims=True) / 127
    expected = (np.rint(x / x_scale) @ np.rint(weight / w_scale)) * x_scale * w_scale
    np.testing.assert_allclose(_run(model, x), expected, rtol=1e-4, atol=1e-3)
    assert np.abs(_run(model, x) - x @ weight).max() / np.abs(x @ weight).max() < 0.02


def test_per_token_scales_keep_an_outlier_row_from_flattening_the_others():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((K, N)).astype(np.float32)
    x = rng.standard_normal((1, 4, K)).astype(np.float32)
    x[0, 0] *= 1000  # an "attention sink" row
    x[0, 3] = 0  # and an all-zero one: zeros out, not 0 / 0
    model = _matmul_model(weight)
    quantize_matmuls_per_token(model)
    y, exact = _run(model, x), x @ weight
    assert np.all(y[0, 3] == 0)
    for row in range(3):
        assert np.abs(y[0, row] - exact[0, row]).max() / np.abs(exact[0, row]).max() < 0.02, row


def test_rms_norm_chain_becomes_one_node_with_the_same_output():
    rng = np.random.default_rng(2)
    gain = rng.uniform(0.5, 2, K).astype(np.float32)
    c = numpy_helper.from_array
    nodes = [helper.make_node("Pow", ["x", "two"], ["p"]),
             helper.make_node("ReduceMean", ["p", "axes"], ["m"], keepdims=1),
             helper.make_node("Add", ["m", "eps"], ["a"]),
             helper.make_node("Sqrt", ["a"], ["s"]),
             helper.make_node("Reciprocal", ["s"], ["r"]),
             helper.make_node("Mul", ["x", "r"], ["n"]),
             helper.make_node("Mul", ["gain", "n"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", K])],
                              [c(np.array(2, np.float32), "two"), c(np.array([-1], np.int64), "axes"),
                               c(np.array(1e-6, np.float32), "eps"), c(gain, "gain")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.standard_normal((1, 3, K)).astype(np.float32)
    before = _run(model, x)
    assert fuse_rms_norm(model) == 1
    assert [n.op_type for n in model.graph.node] == ["SimplifiedLayerNormalization"]
    np.testing.assert_allclose(_run(model, x), before, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(before, gain * x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6), rtol=1e-5)
