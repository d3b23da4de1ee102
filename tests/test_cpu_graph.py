"""The CPU-only rewrites (export/cpu_graph.py): per-token int8 matmuls and the fused RMSNorm against numpy on small
graphs, the fused attention against the exported decoder, the vision graph's fused attention and GELU against the
exported vision graph."""
from __future__ import annotations

import numpy as np
import pytest
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgevl.cpu import MATMUL_KERNEL_ENV, attention_tiles, configure_session, int8_matmul_kernels, matmul_library
from edgevl.export.cpu_graph import (drop_matmul_output_requantization, fuse_attention, fuse_gelu,
                                     fuse_matmul_epilogues, fuse_rms_norm, fuse_vision_attention,
                                     quantize_matmuls_per_token, use_edgevl_attention, use_edgevl_int4_matmul,
                                     use_edgevl_int8_matmul)
from edgevl.precisions import INT4, INT8

K, N = 128, 96


def _run(model, x, threads=0, **inputs):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    configure_session(options)  # exact integer products on x86 without VNNI too
    if any(o.domain == "edgevl" for o in model.opset_import):
        options.register_custom_ops_library(str(matmul_library()))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, **inputs})[0]


def _matmul_model(weight, rows="s"):
    k, n = weight.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, n])],
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


def test_a_one_row_output_is_one_dynamic_quantize_matmul():
    """The logits' MatMul (graph output [1, 1, vocab]): per tensor is per token, in one fused node."""
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((K, N)).astype(np.float32)
    x = rng.standard_normal((1, 1, K)).astype(np.float32)
    model = _matmul_model(weight, rows=1)
    assert quantize_matmuls_per_token(model) == 1
    assert [n.op_type for n in model.graph.node] == ["DynamicQuantizeMatMul"]
    # ONNX's DynamicQuantizeLinear written out: asymmetric uint8 over [min(x, 0), max(x, 0)].
    lo, hi = min(x.min(), 0), max(x.max(), 0)
    x_scale = (hi - lo) / 255
    zero_point = np.clip(np.rint(-lo / x_scale), 0, 255)
    x_q = np.clip(np.rint(x / x_scale) + zero_point, 0, 255)
    w_scale = np.abs(weight).max(0) / 127
    expected = ((x_q - zero_point) @ np.rint(weight / w_scale)) * x_scale * w_scale
    np.testing.assert_allclose(_run(model, x), expected, rtol=1e-4, atol=1e-3)


needs_edgevl_matmul = pytest.mark.skipif(
    matmul_library() is None, reason="edgevl's ops (Int8MatMul, Int4MatMul, GroupQueryAttention) are not installed or "
    "cannot run here (x86-64 with AVX2 and FMA, a C compiler when edgevl was installed)")


@needs_edgevl_matmul
# 70: K past a 32-value block. 102: N past a 4-column group, and a one-row input's last task read as four streams and
# two groups after them (kernels/ort_matmul.c, multiply_columns). 90: a last task of 7 groups, whose panel tiles run
# past N. 300: one-row inputs over several VNNI tasks (VNNI_ROW_COLUMNS), the last of 11 groups.
@pytest.mark.parametrize("k, n", [(K, N), (70, 102), (70, 90), (70, 300)])
@pytest.mark.parametrize("threads", [1, 2])
def test_edgevl_int8_matmul_gives_the_quantized_graphs_outputs_bit_for_bit(k, n, threads, int8_kernel):
    """decoder_avx2.onnx's rewrite: each per-token chain and the one-row DynamicQuantizeMatMul become one Int8MatMul
    computing the same quantization, integers and float scaling, so its outputs equal ONNX Runtime's exactly
    (prefill-sized and decode-sized inputs, row counts either side of where AMX takes over and past its blocks of 32
    (one row past: a block of one), an outlier row, an all-zero row)."""
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((1, 37, k)).astype(np.float32)
    x[0, 2] *= 1000
    x[0, 5] = 0
    for rows, inputs in (("s", x), ("s", x[:, :1]), ("s", x[:, :6]), ("s", x[:, :7]), ("s", x[:, :8]),
                         ("s", x[:, :15]), ("s", x[:, :16]), ("s", x[:, :33]), (1, x[:, 4:5])):
        model = _matmul_model(weight, rows)
        quantize_matmuls_per_token(model)
        rewritten = onnx.ModelProto()
        rewritten.CopyFrom(model)
        assert use_edgevl_int8_matmul(rewritten) == 1
        [node] = rewritten.graph.node
        assert (node.op_type, helper.get_node_attr_value(node, "per_token")) == ("Int8MatMul", int(rows != 1))
        assert {t.name for t in rewritten.graph.initializer} == {"w.int8", "w.scale"}
        np.testing.assert_array_equal(_run(rewritten, inputs, threads), _run(model, inputs, threads))


def _nbits_model(codes, scales, k, block, rows="s", **extra):
    """MatMulNBits as the int4 export writes it: 4-bit codes [N, blocks, block / 2] and scales [N, blocks]."""
    n = codes.shape[0]
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], name="layer.mlp", domain="com.microsoft", K=k, N=n,
                            bits=4, block_size=block, accuracy_level=4, **extra)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, n])],
                              [numpy_helper.from_array(codes, "w"), numpy_helper.from_array(scales, "s")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                   helper.make_opsetid("com.microsoft", 1)])


def _int4_reference(x, codes, scales, k, block):
    """MatMulNBits' arithmetic with int8 compute (accuracy_level 4), in float64 around exact integer sums: each block
    of a row quantized to rne(x * (127 / amax)) (float32, as MLAS), times the codes less 8, scaled by
    (amax / 127) * scale."""
    n, blocks = scales.shape
    values = np.stack([codes & 15, codes >> 4], -1).reshape(n, blocks, block).astype(np.int64) - 8
    padded = np.zeros((*x.shape[:-1], blocks * block), np.float32)
    padded[..., :k] = x
    xb = padded.reshape(*x.shape[:-1], blocks, block)
    amax = np.abs(xb).max(-1)
    inverse = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax != 0)
    q = np.rint(xb * inverse[..., None]).astype(np.int64)
    sums = np.einsum("...bk,nbk->...nb", q, values)
    return (sums * (amax / np.float32(127)).astype(np.float64)[..., None, :] * scales.astype(np.float64)).sum(-1)


def _int4_operands(k, n, block, seed):
    """Random 4-bit codes and scales in MatMulNBits' layout, and 37 rows of activations with an outlier row (2) and an
    all-zero one (5)."""
    rng = np.random.default_rng(seed)
    blocks = -(-k // block)
    codes = rng.integers(0, 256, (n, blocks, block // 2), dtype=np.uint8)
    scales = rng.uniform(1e-3, 2e-2, (n, blocks)).astype(np.float32)
    x = rng.standard_normal((1, 37, k)).astype(np.float32)
    x[0, 2] *= 1000
    x[0, 5] = 0
    return codes, scales, x


@needs_edgevl_matmul
# 200, 20: past a block, a group. 200, 300: one-row inputs over two tasks (ROW_GROUPS_PER_TASK), the last of 6 groups.
@pytest.mark.parametrize("k, n, block", [(K, N, 32), (200, 20, 64), (896, 40, 128), (200, 300, 64)])
@pytest.mark.parametrize("threads", [1, 2])
def test_edgevl_int4_matmul_computes_matmulnbits_arithmetic(k, n, block, threads):
    """decoder_avx2.onnx's int4 rewrite: each MatMulNBits becomes Int4MatMul, the same block quantization of the
    activations and the same integers, summed exactly: within float rounding of the float64 reference, and of ONNX
    Runtime's own MatMulNBits (prefill- and decode-sized inputs, an outlier row, an all-zero row)."""
    codes, scales, x = _int4_operands(k, n, block, seed=11)
    for rows, inputs in (("s", x), (1, x[:, 4:5])):
        model = _nbits_model(codes, scales, k, block, rows)
        rewritten = onnx.ModelProto()
        rewritten.CopyFrom(model)
        assert use_edgevl_int4_matmul(rewritten) == 1
        [node] = rewritten.graph.node
        assert (node.domain, node.op_type) == ("edgevl", "Int4MatMul")
        assert {a.name: helper.get_attribute_value(a) for a in node.attribute} == {"K": k, "N": n, "block_size": block}
        got, nbits = _run(rewritten, inputs, threads), _run(model, inputs, threads)
        reference = _int4_reference(inputs, codes, scales, k, block)
        peak = np.maximum(np.abs(reference).max(-1, keepdims=True), 1e-30)  # per row: the outlier's is 1000x
        assert np.all(np.abs(got - reference) / peak < 1e-6)
        assert np.all(np.abs(got - nbits) / peak < 1e-5)
        if rows == "s":
            assert not got[0, 5].any()  # the all-zero row


@needs_edgevl_matmul
@pytest.mark.parametrize("k, n, block", [(K, N, 32), (200, 20, 64), (896, 40, 128), (200, 300, 64)])
def test_int4_matmul_gives_its_avx2_kernels_outputs_bit_for_bit_on_every_kernel(k, n, block, int8_kernel):
    """Several rows on AVX-512 VNNI or AMX tiles (the weights unpacked into panels): the same integer per block and the
    same float steps in the same order as the AVX2 kernels (row counts either side of where the panels take over and
    past their blocks of 32; the test above checks this CPU's default kernels against the reference)."""
    codes, scales, x = _int4_operands(k, n, block, seed=13)
    rewritten = _nbits_model(codes, scales, k, block)
    assert use_edgevl_int4_matmul(rewritten) == 1
    for rows in (37, 33, 16, 15):
        got = _run(rewritten, x[:, :rows], 2)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(MATMUL_KERNEL_ENV, "avx2")
            np.testing.assert_array_equal(got, _run(rewritten, x[:, :rows], 2))


def test_int4_rewrite_leaves_what_int4matmul_does_not_compute():
    """Zero points, other widths and block sizes stay MatMulNBits."""
    codes, scales = np.zeros((8, 4, 8), np.uint8), np.ones((8, 4), np.float32)
    assert use_edgevl_int4_matmul(_nbits_model(codes, scales, 64, 16)) == 0
    zero_points = _nbits_model(np.zeros((8, 2, 16), np.uint8), np.ones((8, 2), np.float32), 64, 32)
    zero_points.graph.node[0].input.append("zp")
    assert use_edgevl_int4_matmul(zero_points) == 0


@needs_edgevl_matmul
def test_int4_matmul_refuses_a_block_size_it_has_no_kernel_for():
    model = _nbits_model(np.zeros((8, 4, 8), np.uint8), np.ones((8, 4), np.float32), 64, 16)
    node = model.graph.node[0]
    node.op_type, node.domain = "Int4MatMul", "edgevl"
    model.opset_import.append(helper.make_opsetid("edgevl", 1))
    with pytest.raises(Exception, match=r"Int4MatMul node layer\.mlp: block_size must be 32, 64 or 128"):
        _run(model, np.zeros((1, 2, 64), np.float32))


def _layer_tail_model(op, k, n, tail, rng, rows="s"):
    """edgevl's `op` (Int8MatMul per token, or Int4MatMul) of n columns, then what a decoder layer puts after such a
    matmul (`tail`: "bias", "swiglu" or "residual", joined by "+"), as the exported graph writes it, value_info
    included (fuse_matmul_epilogues reads the shapes)."""
    if op == "Int8MatMul":
        w = rng.integers(-127, 128, (k, n), dtype=np.int8)
        initializers = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(
            rng.uniform(0.002, 0.02, n).astype(np.float32), "s")]
        matmul = helper.make_node(op, ["x", "w", "s"], ["m"], name="layer.mlp", domain="edgevl", per_token=1)
    else:
        block = 32
        initializers = [numpy_helper.from_array(rng.integers(0, 256, (n, -(-k // block), block // 2), dtype=np.uint8),
                                                "w"),
                        numpy_helper.from_array(rng.uniform(0.002, 0.02, (n, -(-k // block))).astype(np.float32), "s")]
        matmul = helper.make_node(op, ["x", "w", "s"], ["m"], name="layer.mlp", domain="edgevl", K=k, N=n,
                                  block_size=block)
    nodes, width, last = [matmul], n, "m"
    shapes = {"m": n}
    if "bias" in tail:
        initializers.append(numpy_helper.from_array((3 * rng.standard_normal(n)).astype(np.float32), "b"))
        nodes.append(helper.make_node("Add", [last, "b"], ["biased"]))
        last = "biased"
        shapes[last] = n
    if "swiglu" in tail:
        width = n // 2
        nodes += [helper.make_node("Split", [last], ["gate", "up"], axis=2, num_outputs=2),
                  helper.make_node("Sigmoid", ["gate"], ["sig"]), helper.make_node("Mul", ["gate", "sig"], ["silu"]),
                  helper.make_node("Mul", ["silu", "up"], ["gated"])]
        shapes.update(gate=width, up=width, sig=width, silu=width, gated=width)
        last = "gated"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows, k])]
    if "residual" in tail:
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, rows, width]))
        nodes.append(helper.make_node("Add", ["r", last], ["summed"]))
        shapes["summed"] = width
        last = "summed"
    nodes[-1].output[0] = "y"
    shapes["y"] = shapes.pop(last)
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                  [1, rows, width])], initializers,
                              value_info=[helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, rows, size])
                                          for name, size in shapes.items() if name != "y"])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("edgevl", 1)])


@needs_edgevl_matmul
@pytest.mark.parametrize("op", ["Int8MatMul", "Int4MatMul"])
# n 26: 13 columns a half, 8 on the vector path and 5 after it; 96: vector only; 128: halves of whole tile pairs,
# which Int8MatMul's panel kernels (AVX-512 VNNI, AMX) store with the SwiGLU, both halves in one task
@pytest.mark.parametrize("tail, n", [("bias", 26), ("residual", 26), ("bias+swiglu+residual", 26), ("swiglu", 96),
                                     ("swiglu+residual", 96), ("bias+swiglu+residual", 128)])
@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_epilogue_gives_the_graphs_outputs_bit_for_bit(op, tail, n, threads, int8_kernel):
    """fuse_matmul_epilogues folds the bias Add, the SwiGLU (Split, Sigmoid, Mul, Mul, which ONNX Runtime runs as
    QuickGelu and Mul on MLAS's logistic) and the residual Add into edgevl's matmul, computed in those nodes' float
    arithmetic: the same outputs bit for bit, for prefill- and decode-sized inputs whose gate values span the logistic's
    whole range, its +-18 clamp included, on each kernel this CPU runs."""
    rng = np.random.default_rng(13)
    k = 64
    model = _layer_tail_model(op, k, n, tail, rng)
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    assert fuse_matmul_epilogues(fused) == len(model.graph.node) - 1
    [node] = fused.graph.node
    bias = "b" if "bias" in tail else ""
    assert list(node.input) == ["x", "w", "s"] + ([bias, "r"] if "residual" in tail else [bias] if bias else [])
    assert [a.i for a in node.attribute if a.name == "swiglu"] == ([1] if "swiglu" in tail else [])
    x = (rng.standard_normal((1, 37, k)) * np.geomspace(1e-3, 30, 37)[:, None]).astype(np.float32)
    x[0, 5] = 0
    width = n // 2 if "swiglu" in tail else n
    r = rng.standard_normal((1, 37, width)).astype(np.float32)
    for rows in (slice(None), slice(4, 5)):
        inputs = {"r": r[:, rows]} if "residual" in tail else {}
        np.testing.assert_array_equal(_run(fused, x[:, rows], threads, **inputs),
                                      _run(model, x[:, rows], threads, **inputs))
    if "swiglu" in tail:  # the gate values the comparison went through
        gate = onnx.ModelProto()
        gate.CopyFrom(model)
        gate.graph.output[0].name = "gate"
        gate.graph.output[0].type.tensor_type.shape.dim[2].dim_value = n // 2
        values = np.abs(_run(gate, x, threads, **({"r": r} if "residual" in tail else {})))
        assert values.max() > 18 and (values < 1).mean() > 0.05


def test_epilogue_rewrite_leaves_what_the_op_does_not_compute():
    """Not folded: a residual that broadcasts, a Split that is not into halves of the last axis, a gate read again,
    an output something else reads."""
    rng = np.random.default_rng(3)
    broadcast = _layer_tail_model("Int8MatMul", 32, 16, "residual", rng)
    broadcast.graph.input[1].type.tensor_type.shape.dim[1].dim_value = 1
    uneven = _layer_tail_model("Int8MatMul", 32, 16, "swiglu", rng)
    uneven.graph.initializer.append(numpy_helper.from_array(np.array([6, 10], np.int64), "sizes"))
    uneven.graph.node[1].input.append("sizes")
    del uneven.graph.node[1].attribute[:]
    uneven.graph.node[1].attribute.append(helper.make_attribute("axis", 2))
    uneven_attribute = _layer_tail_model("Int8MatMul", 32, 16, "swiglu", rng)  # opsets before 13
    uneven_attribute.graph.node[1].attribute.append(helper.make_attribute("split", [6, 10]))
    other_axis = _layer_tail_model("Int8MatMul", 32, 16, "swiglu", rng)
    other_axis.graph.node[1].attribute[0].i = 1
    gate_read_again = _layer_tail_model("Int8MatMul", 32, 16, "swiglu", rng)
    gate_read_again.graph.output.append(helper.make_tensor_value_info("gate", TensorProto.FLOAT, [1, "s", 8]))
    for model in (broadcast, uneven, uneven_attribute, other_axis, gate_read_again):
        assert fuse_matmul_epilogues(model) == 0
    read_twice = _layer_tail_model("Int8MatMul", 32, 16, "bias+residual", rng)
    read_twice.graph.output.append(helper.make_tensor_value_info("biased", TensorProto.FLOAT, [1, "s", 16]))
    assert fuse_matmul_epilogues(read_twice) == 1  # the bias only: its sum is an output
    assert [n.op_type for n in read_twice.graph.node] == ["Int8MatMul", "Add"]


@needs_edgevl_matmul
def test_matmul_epilogue_names_the_node_when_the_residual_is_not_the_outputs_shape():
    model = _layer_tail_model("Int8MatMul", 32, 16, "residual", np.random.default_rng(4))
    fuse_matmul_epilogues(model)
    with pytest.raises(Exception, match=r"Int8MatMul node layer\.mlp: the residual has 32 values, expected 48"):
        _run(model, np.ones((1, 3, 32), np.float32), r=np.ones((1, 2, 16), np.float32))


def _gqa_session(domain, heads, kv_heads, head, rows=1, threads=0, rotary=True, scale=0.0):
    """One GroupQueryAttention as fuse_attention writes it (packed QKV, rotary inside unless `rotary` is False) in
    `domain`."""
    tables = ["cos", "sin"] if rotary else []
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_k", "past_v", "seqlens_k", "total", *tables],
                            ["y", "present_k", "present_v"], name="gqa.0", domain=domain, num_heads=heads,
                            kv_num_heads=kv_heads, scale=scale, do_rotary=int(rotary), rotary_interleaved=0)
    floats = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731
    graph = helper.make_graph(
        [node], "g", [floats("qkv", [1, rows, (heads + 2 * kv_heads) * head]),
                      floats("past_k", [1, kv_heads, "p", head]), floats("past_v", [1, kv_heads, "p", head]),
                      helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
                      helper.make_tensor_value_info("total", TensorProto.INT32, []),
                      *(floats(name, ["c", head // 2]) for name in tables)],
        [floats(name, None) for name in ("y", "present_k", "present_v")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(domain, 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if domain == "edgevl":
        options.register_custom_ops_library(str(matmul_library()))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _rotary_tables(rows, head):
    angles = np.arange(rows)[:, None] * 10000.0 ** (-np.arange(head // 2) / (head // 2))
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _decode_attention_reference(qkv, past_k, past_v, position, tables, heads, kv_heads, head, scale):
    """GroupQueryAttention's one-row step in float64, written out: rotate the step's query and key halves at
    `position` (with tables (cos, sin); None: no rotary), append key and value after the past's first `position` rows,
    softmax(scale q k^T) v (scale 0: 1 / sqrt(head)), query head h on KV head h // (heads / kv_heads)."""
    x = qkv.reshape(heads + 2 * kv_heads, head).astype(np.float64)
    def rotate(v):
        if tables is None:
            return v
        half, c, s = head // 2, tables[0][position].astype(np.float64), tables[1][position].astype(np.float64)
        return np.concatenate([v[:, :half] * c - v[:, half:] * s, v[:, :half] * s + v[:, half:] * c], 1)

    q, k, v = rotate(x[:heads]), rotate(x[heads:heads + kv_heads]), x[heads + kv_heads:]
    keys = np.concatenate([past_k[0, :, :position], k[:, None]], 1)
    values = np.concatenate([past_v[0, :, :position], v[:, None]], 1)
    out = []
    for h in range(heads):
        scores = keys[h // (heads // kv_heads)] @ q[h] * (scale or 1 / np.sqrt(head))
        weights = np.exp(scores - scores.max())
        out.append(weights @ values[h // (heads // kv_heads)] / weights.sum())
    return np.concatenate(out), k, v


@needs_edgevl_matmul
# Qwen2-0.5B's heads (7 query heads a KV head), InternLM2-1.8B's (2, head 128), Phi-3-mini's (1, head 96), the tiny
# test models' head 16, head 80; without rotary and with the scale folded away (1, as fuse_attention leaves it) head
# 32, and head 24, not a multiple of 16, which is handed to ONNX Runtime's kernel whole. Positions on both sides of
# the 64-position chunks the kernel splits the cache into, and past 256 (the first chunk's partial left).
@pytest.mark.parametrize("heads, kv_heads, head, rotary, scale", [
    (14, 2, 64, True, 0.0), (16, 8, 128, True, 0.0), (4, 4, 96, True, 0.0), (4, 2, 16, True, 0.0),
    (4, 2, 80, True, 0.0), (4, 2, 32, False, 1.0), (4, 2, 24, False, 1.0)])
@pytest.mark.parametrize("threads", [1, 2])
def test_edgevl_attention_decode_step_computes_group_query_attention(heads, kv_heads, head, rotary, scale, threads):
    """edgevl's GroupQueryAttention on the one-row decode step: its output against GroupQueryAttention written out in
    float64 and against ONNX Runtime's kernel, the step's rotated key and value written at its row of the cache (in
    place in one buffer bound as past and present, or after the past's rows copied into a separate present), every
    other row as it was."""
    rng = np.random.default_rng(heads + head)
    ours, onnxruntime = (_gqa_session(d, heads, kv_heads, head, threads=threads, rotary=rotary, scale=scale)
                         for d in ("edgevl", "com.microsoft"))
    capacity = 300
    tables = _rotary_tables(capacity, head) if rotary else None
    differs = False
    for position in (0, 1, 63, 64, 65, 130, 299):
        qkv = rng.standard_normal((1, 1, (heads + 2 * kv_heads) * head)).astype(np.float32)
        cache = [rng.standard_normal((1, kv_heads, capacity, head)).astype(np.float32) for _ in range(2)]
        feeds = {"qkv": qkv, "seqlens_k": np.array([position], np.int32), "total": np.array(position + 1, np.int32),
                 **(dict(zip(("cos", "sin"), tables)) if rotary else {})}
        want, key, value = _decode_attention_reference(qkv, *cache, position, tables, heads, kv_heads, head, scale)
        # a separate present: past holds exactly the earlier rows
        y, present_k, present_v = ours.run(None, {**feeds, "past_k": cache[0][:, :, :position],
                                                  "past_v": cache[1][:, :, :position]})
        np.testing.assert_allclose(y[0, 0], want, rtol=1e-5, atol=1e-5)
        for present, past, row in ((present_k, cache[0], key), (present_v, cache[1], value)):
            assert present.shape == (1, kv_heads, position + 1, head)
            np.testing.assert_array_equal(present[:, :, :position], past[:, :, :position])
            np.testing.assert_allclose(present[0, :, position], row, rtol=1e-6, atol=1e-6)
        reference = onnxruntime.run(None, {**feeds, "past_k": cache[0], "past_v": cache[1]})
        # one buffer bound as past and present: written in place, the rows after the step's untouched
        shared = [ort.OrtValue.ortvalue_from_numpy(c.copy()) for c in cache]
        binding = ours.io_binding()
        binding.bind_output("y", "cpu")
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name, buffer in zip(("k", "v"), shared):
            binding.bind_ortvalue_input(f"past_{name}", buffer)
            binding.bind_ortvalue_output(f"present_{name}", buffer)
        ours.run_with_iobinding(binding)
        y = binding.get_outputs()[0].numpy()
        np.testing.assert_allclose(y, reference[0], rtol=1e-5, atol=1e-5)
        differs |= not np.array_equal(y, reference[0])
        for buffer, before, row in zip(shared, cache, (present_k, present_v)):
            after = buffer.numpy()
            np.testing.assert_array_equal(np.delete(after, position, axis=2), np.delete(before, position, axis=2))
            np.testing.assert_array_equal(after[:, :, position], row[:, :, position])
    # The kernel ran (its sums are ordered unlike ONNX Runtime's), except for the head it hands over.
    assert differs == (head % 16 == 0)


@needs_edgevl_matmul
def test_edgevl_attention_hands_prefill_to_onnxruntime_bit_for_bit():
    """A prompt and a later prefill chunk (rows > 1) run ONNX Runtime's own GroupQueryAttention kernel inside
    edgevl's op: the same outputs and cache, bit for bit."""
    heads, kv_heads, head, capacity = 14, 2, 64, 128
    ours, onnxruntime = (_gqa_session(d, heads, kv_heads, head, rows="s") for d in ("edgevl", "com.microsoft"))
    cos, sin = _rotary_tables(capacity, head)
    rng = np.random.default_rng(5)
    past = [np.zeros((1, kv_heads, capacity, head), np.float32) for _ in range(2)]
    for start, rows in ((0, 40), (40, 30)):
        feeds = {"qkv": rng.standard_normal((1, rows, (heads + 2 * kv_heads) * head)).astype(np.float32),
                 "past_k": past[0], "past_v": past[1], "seqlens_k": np.array([start + rows - 1], np.int32),
                 "total": np.array(start + rows, np.int32), "cos": cos, "sin": sin}
        got, want = ours.run(None, feeds), onnxruntime.run(None, feeds)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        past = want[1:]


@needs_edgevl_matmul
def test_edgevl_attention_names_the_node_when_seqlens_k_and_the_total_disagree():
    session = _gqa_session("edgevl", 4, 2, 16)
    cos, sin = _rotary_tables(8, 16)
    cache = np.zeros((1, 2, 8, 16), np.float32)
    feeds = {"qkv": np.zeros((1, 1, 128), np.float32), "past_k": cache, "past_v": cache,
             "seqlens_k": np.array([3], np.int32), "total": np.array(6, np.int32), "cos": cos, "sin": sin}
    with pytest.raises(Exception, match=r"GroupQueryAttention node gqa\.0: seqlens_k must be total_sequence_length"):
        session.run(None, feeds)


@pytest.mark.parametrize("op", ["GroupQueryAttention", "MultiHeadAttention"])
def test_attention_rewrite_moves_each_attention_of_its_kind_to_edgevl(op):
    other = "MultiHeadAttention" if op == "GroupQueryAttention" else "GroupQueryAttention"
    model = helper.make_model(helper.make_graph(
        [helper.make_node(op, ["q"], ["y"], domain="com.microsoft", num_heads=2),
         helper.make_node(other, ["y"], ["z"], domain="com.microsoft", num_heads=2),
         helper.make_node("Relu", ["z"], ["r"])], "g", [], []),
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    assert use_edgevl_attention(model, op) == 1
    assert [(n.op_type, n.domain) for n in model.graph.node] == [(op, "edgevl"), (other, "com.microsoft"),
                                                                 ("Relu", "")]
    assert {o.domain for o in model.opset_import} >= {"edgevl"}
    assert use_edgevl_attention(model, op) == 0


def _mha_session(domain, heads, width, scale, threads=0):
    """One MultiHeadAttention as fuse_vision_attention writes it (query, key, value [B, S, width]), ONNX Runtime's
    (com.microsoft) or edgevl's."""
    scaled = {} if scale is None else {"scale": scale}  # none: the op's default, 1 / sqrt(head)
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain=domain, num_heads=heads,
                            name="mha.0", **scaled)
    tensors = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", width]) for n in "qkvy"]
    model = helper.make_model(helper.make_graph([node], "g", tensors[:3], tensors[3:]),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(domain, 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if domain == "edgevl":
        options.register_custom_ops_library(str(matmul_library()))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _bf16_attention(q, k, v, heads, scale):
    """edgevl's MultiHeadAttention on AMX-BF16 tiles, written out in float64: Q, K and V rounded to bf16 (nearest
    even), the softmax of scale x Q K^T in float, its weights rounded to bf16 before x V, divided by the sum of the
    unrounded weights."""
    import ml_dtypes

    def bf16(x):
        return x.astype(ml_dtypes.bfloat16).astype(np.float64)

    def split(x):  # [B, S, heads * head] -> [B, heads, S, head]
        return x.reshape(*x.shape[:2], heads, -1).transpose(0, 2, 1, 3)

    q, k, v = (bf16(split(x)) for x in (q, k, v))
    scores = scale * q @ k.transpose(0, 1, 3, 2)
    weights = np.exp(scores - scores.max(-1, keepdims=True)).astype(np.float32)
    out = bf16(weights) @ v / weights.astype(np.float64).sum(-1, keepdims=True)
    return out.transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[2], -1)


def _mha_feeds(batch, rows, width, seed):
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal((batch, rows, width)) * 2).astype(np.float32) for n in "qkv"}


needs_attention_tiles = pytest.mark.skipif(
    not attention_tiles(), reason="edgevl's MultiHeadAttention on AMX-BF16 tiles: this CPU has no AMX-BF16 (or "
    "EDGEVL_MATMUL_KERNEL names other kernels); elsewhere the op is ONNX Runtime's kernel, tested bit for bit")


@needs_attention_tiles
# 16 x 64 at 1025 rows: an InternViT-300M layer. 37 and 33: rows past a block of 32; 1: one row. 48 and 80: a head
# past a step of 32 (zeros pad the product's depth) and an odd count of 16-column tiles; 256: the widest head. One
# without the scale attribute (the op's default, 1 / sqrt(head)).
@pytest.mark.parametrize("batch, rows, heads, head, scaled", [(1, 1025, 16, 64, True), (1, 37, 2, 16, False),
                                                              (2, 33, 3, 48, True), (1, 1, 4, 80, True),
                                                              (1, 70, 1, 256, True)])
@pytest.mark.parametrize("threads", [1, 2])
def test_edgevl_multi_head_attention_computes_bf16_attention_on_amx_tiles(batch, rows, heads, head, scaled, threads):
    """Against bf16 attention written out (_bf16_attention) and against ONNX Runtime's fp32 kernel: at least ten times
    nearer the first than the fp32 result is (float sums in another order, and the exp polynomial's last bit moving a
    weight's bf16 rounding: 1e-7 to 3e-4 of the largest output), and 0.1-1% from the second, as bf16's 8 significant
    bits make it."""
    feeds, scale = _mha_feeds(batch, rows, heads * head, seed=rows), 1 / np.sqrt(head)
    attribute = scale if scaled else None
    got = _mha_session("edgevl", heads, heads * head, attribute, threads).run(None, feeds)[0]
    want = _bf16_attention(feeds["q"], feeds["k"], feeds["v"], heads, scale)
    fp32 = _mha_session("com.microsoft", heads, heads * head, attribute).run(None, feeds)[0]
    assert np.abs(got - want).max() <= min(1e-3 * np.abs(want).max(), 0.1 * np.abs(fp32 - want).max())
    error = np.linalg.norm(got - fp32) / np.linalg.norm(fp32)
    assert 1e-4 < error < 1e-2, error  # bf16, so not the fp32 kernel's result


@needs_edgevl_matmul
@pytest.mark.parametrize("head, kernel, scale", [(16, "avx2", 0.25), (16, "avx2", None), (24, None, 0.25)])
def test_edgevl_multi_head_attention_hands_other_calls_to_onnxruntime_bit_for_bit(head, kernel, scale, monkeypatch):
    """Without the tiles (a CPU without AMX-BF16, EDGEVL_MATMUL_KERNEL naming other kernels) or for a head that is
    not a multiple of 16, edgevl's MultiHeadAttention runs ONNX Runtime's kernel: the same output, bit for bit."""
    if kernel is not None:
        monkeypatch.setenv(MATMUL_KERNEL_ENV, kernel)
    feeds, heads = _mha_feeds(2, 37, 3 * head, seed=head), 3
    got, want = (_mha_session(d, heads, heads * head, scale).run(None, feeds)[0] for d in ("edgevl", "com.microsoft"))
    np.testing.assert_array_equal(got, want)


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


@pytest.mark.parametrize("attention", ["com.microsoft", pytest.param("edgevl", marks=needs_edgevl_matmul)])
@pytest.mark.parametrize("family, options", [("qwen2", {}), ("internlm2", {}),
                                             ("phi3", {"original_max_position_embeddings": 10})])
def test_fused_attention_matches_the_exported_attention(tiny_checkpoint, tmp_path, family, options, attention):
    """GroupQueryAttention (RoPE inside) in place of each layer's exported attention: same logits and KV through
    a prefill and decode steps. Phi-3's LongRoPE switches to its long factors at the second decode step (position 10,
    the eleventh). ONNX Runtime's GroupQueryAttention, and edgevl's (decoder_avx2.onnx's: its own decode step)."""
    from edgevl.backends.torch_backend import TorchBackend
    from edgevl.checkpoint import load_checkpoint
    from edgevl.export.graphs import export_decoder
    from edgevl.specs import spec_to_dict

    checkpoint = load_checkpoint(tiny_checkpoint(family, **options))
    lm = TorchBackend(checkpoint, dtype="float32").lm
    export_decoder(lm, tmp_path / "decoder.onnx", max_seq=64)
    model = onnx.load(tmp_path / "decoder.onnx")
    spec = spec_to_dict(checkpoint.spec)["decoder"]
    assert fuse_attention(model, spec, max_seq=64) == spec["num_layers"]
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == spec["num_layers"]
    # The softmax scale went into the QKV projection's query columns (MLAS's one-row GEMM needs alpha 1).
    assert all(helper.get_node_attr_value(n, "scale") == 1.0 for n in gqa)
    assert not any(n.op_type in ("Softmax", "Concat") for n in model.graph.node)
    options = ort.SessionOptions()
    if attention == "edgevl":
        assert use_edgevl_attention(model) == spec["num_layers"]
        options.register_custom_ops_library(str(matmul_library()))
    reference = ort.InferenceSession(str(tmp_path / "decoder.onnx"), providers=["CPUExecutionProvider"])
    candidate = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    kv_shape = (1, spec["num_kv_heads"], 0, spec["hidden_size"] // spec["num_heads"])
    # The "shared" layout: one buffer per KV tensor bound as past and present, left holding the previous
    # sequence's rows (a second generation) that the new one must not read.
    shared = [ort.OrtValue.ortvalue_from_numpy(np.random.default_rng(4).standard_normal(
        kv_shape[:2] + (64,) + kv_shape[3:]).astype(np.float32)) for _ in reference.get_inputs()[2:]]
    rng = np.random.default_rng(3)
    past = {i.name: np.zeros(kv_shape, np.float32) for i in reference.get_inputs()[2:]}
    position = 0
    for step in [9, 1, 1, 1]:
        feeds = {"inputs_embeds": rng.standard_normal((1, step, spec["hidden_size"])).astype(np.float32),
                 "position_ids": np.arange(position, position + step)[None], **past}
        want, got = reference.run(None, feeds), candidate.run(None, feeds)
        for name, a, b in zip([o.name for o in reference.get_outputs()], want, got):
            np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4, err_msg=f"{name} after {position + step}")
        binding = candidate.io_binding()
        binding.bind_cpu_input("inputs_embeds", feeds["inputs_embeds"])
        binding.bind_cpu_input("position_ids", feeds["position_ids"])
        binding.bind_output("logits", "cpu")
        for name, value in zip(past, shared):
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(name.replace("past_key_values.", "present."), value)
        candidate.run_with_iobinding(binding)
        np.testing.assert_allclose(binding.get_outputs()[0].numpy(), want[0], atol=1e-4, rtol=1e-4)
        for value, a in zip(shared, want[1:]):
            np.testing.assert_allclose(value.numpy()[:, :, :position + step], a, atol=1e-4, rtol=1e-4)
        past = dict(zip(past, want[1:]))
        position += step


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_fused_vision_attention_and_gelu_match_the_exported_vision_graph(exported, family):
    """Each layer's attention as MultiHeadAttention and each GELU as Gelu: the exported vision graph's image
    embeddings for two tiles, to float rounding (the int8 export's vision runs these, export/quantize.py)."""
    from edgevl.manifest import read_manifest

    path = exported(family) / "vision.onnx"
    spec = read_manifest(path.parent, verify_checksums=False).spec.vision
    model = onnx.load(path)
    transposes = [n.op_type for n in model.graph.node].count("Transpose")
    assert fuse_vision_attention(model) == spec.num_layers
    assert fuse_gelu(model) == spec.num_layers + 1  # each layer's MLP and the projector's
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MultiHeadAttention") == spec.num_layers and not {"Softmax", "Erf"} & set(ops)
    assert ops.count("Transpose") == transposes - 3 * spec.num_layers  # the heads' permute, K^T and the merge
    assert {helper.get_node_attr_value(n, "num_heads") for n in model.graph.node
            if n.op_type == "MultiHeadAttention"} == {spec.num_heads}
    tiles = np.random.default_rng(5).standard_normal((2, 3, spec.image_size, spec.image_size)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": tiles})[0]
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": tiles})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_vision_rewrites_leave_what_they_do_not_compute():
    """A softmax over another axis, and an erf-based expression that is not GELU, stay as they are."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    constants = [numpy_helper.from_array(np.array(v, np.float32), name)
                 for name, v in (("root2", 2 ** 0.5), ("one", 1.0), ("third", 1 / 3))]
    not_gelu = [helper.make_node("Div", ["x", "root2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
                helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["a", "third"], ["h"]),
                helper.make_node("Mul", ["x", "h"], ["g"]), helper.make_node("Softmax", ["g"], ["y"], axis=0)]
    model = helper.make_model(helper.make_graph(not_gelu, "g", [x], [y], constants),
                              opset_imports=[helper.make_opsetid("", 18)])
    assert fuse_gelu(model) == 0 and fuse_vision_attention(model) == 0
    assert [n.op_type for n in model.graph.node] == ["Div", "Erf", "Add", "Mul", "Mul", "Softmax"]


def _qdq_matmuls(weights, tail: str):
    """x -> Q/DQ -> MatMul(DQ(w0)) -> Q/DQ -> `tail`: "Add" (a bias) or "MatMul" (a second quantized MatMul)."""
    def qdq(name, scale):
        return [helper.make_node("QuantizeLinear", [name, scale, "zp"], [f"{name}.q"]),
                helper.make_node("DequantizeLinear", [f"{name}.q", scale, "zp"], [f"{name}.dq"])]

    nodes = qdq("x", "sx") + [helper.make_node("DequantizeLinear", ["w0", "sw", "zp"], ["w0.dq"]),
                              helper.make_node("MatMul", ["x.dq", "w0.dq"], ["m"])] + qdq("m", "sm")
    nodes += ([helper.make_node("Add", ["m.dq", "b"], ["y"])] if tail == "Add" else
              [helper.make_node("DequantizeLinear", ["w1", "sw", "zp"], ["w1.dq"]),
               helper.make_node("MatMul", ["m.dq", "w1.dq"], ["y"])])
    constants = {"sx": np.float32(4 / 127), "sm": np.float32(64 / 127), "sw": np.float32(1 / 127),
                 "zp": np.int8(0), "w0": weights[0], "w1": weights[1], "b": np.ones(K, np.float32)}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, K])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_a_matmuls_output_requantization_goes_only_where_float_reads_it():
    rng = np.random.default_rng(6)
    weights = rng.integers(-127, 128, (2, K, K)).astype(np.int8)
    x = rng.uniform(-4, 4, (3, K)).astype(np.float32)  # codes over the whole -127..127
    model = _qdq_matmuls(weights, "Add")
    before = _run(model, x)
    assert drop_matmul_output_requantization(model, ("MatMul", "Conv")) == 1
    assert [n.op_type for n in model.graph.node].count("QuantizeLinear") == 1
    # The Add now reads the matmul's float output: exactly the integer product, scaled, plus 1.
    x_codes = np.clip(np.rint(x / np.float32(4 / 127)), -128, 127)
    exact = (x_codes @ weights[0].astype(np.float64)) * (4 / 127) * (1 / 127) + 1
    np.testing.assert_allclose(_run(model, x), exact, rtol=1e-5, atol=1e-5)
    assert np.abs(before - exact).max() > np.abs(_run(model, x) - exact).max()
    chained = _qdq_matmuls(weights, "MatMul")  # a quantized MatMul reads it: its input quantization stays
    assert drop_matmul_output_requantization(chained, ("MatMul", "Conv")) == 0


def test_int4_blocks_are_128_where_every_k_holds_four_and_32_below():
    from edgevl.export.quantize import matmulnbits_block_size

    assert matmulnbits_block_size({"hidden_size": 896, "intermediate_size": 4864}, 128) == 128  # Qwen2-0.5B
    assert matmulnbits_block_size({"hidden_size": 2048, "intermediate_size": 8192}, 128) == 128  # InternLM2-1.8B
    assert matmulnbits_block_size({"hidden_size": 64, "intermediate_size": 96}, 128) == 32  # the tests' tiny models


def _graph_and_values(model):
    nodes = sorted((n.op_type, tuple(n.input), tuple(n.output), str(n.attribute)) for n in model.graph.node)
    return nodes, {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("bits", [8, 4])
def test_tensor_by_tensor_quantization_from_external_data_equals_the_in_memory_rewrite(tiny_checkpoint, tmp_path,
                                                                                       monkeypatch, bits):
    """quantize_decoder_weights reads an fp32 graph's external data one weight at a time and writes the quantized
    weights to the output's data file as it goes: the graph and every tensor equal the whole-model rewrite in
    memory (ONNX Runtime's MatMulNBitsQuantizer for int4)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from edgevl.backends.torch_backend import TorchBackend
    from edgevl.checkpoint import load_checkpoint
    from edgevl.export import quantize
    from edgevl.export.graphs import export_decoder
    from edgevl.specs import spec_to_dict

    checkpoint = load_checkpoint(tiny_checkpoint("qwen2"))
    spec = spec_to_dict(checkpoint.spec)["decoder"]
    export_decoder(TorchBackend(checkpoint, dtype="float32").lm, tmp_path / "inline.onnx", max_seq=64)
    (tmp_path / "fp32").mkdir()
    onnx.save(onnx.load(tmp_path / "inline.onnx"), tmp_path / "fp32" / "decoder.onnx", save_as_external_data=True,
              location="decoder.onnx.data", size_threshold=0)
    monkeypatch.setattr(quantize, "EXTERNAL_DATA_BYTES", 0)  # the tiny graph's output goes to external data too
    quantize.quantize_decoder_weights(tmp_path / "fp32" / "decoder.onnx", tmp_path / "decoder.onnx",
                                      {8: INT8, 4: INT4}[bits], spec, max_seq=64, log=lambda _: None)
    graph = onnx.load(tmp_path / "decoder.onnx", load_external_data=False).graph
    referenced = sum(int(e.value) for t in graph.initializer for e in t.external_data if e.key == "length")
    # The data file holds what the graph references and nothing else (the query-scaled fp32 QKV weights the int8
    # rewrite replaced are not left behind).
    assert 0 < referenced == (tmp_path / "decoder.onnx.data").stat().st_size
    streamed = onnx.load(tmp_path / "decoder.onnx")

    expected = onnx.load(tmp_path / "inline.onnx")
    fuse_rms_norm(expected)
    fuse_attention(expected, spec, max_seq=64)
    if bits == 8:
        quantize_matmuls_per_token(expected)
    else:
        block = quantize.matmulnbits_block_size(spec, INT4.block_size)
        quantizer = MatMulNBitsQuantizer(expected, bits=4, block_size=block, is_symmetric=True, accuracy_level=4)
        quantizer.process()
        quantizer.model.topological_sort()
    got_nodes, got_values = _graph_and_values(streamed)
    want_nodes, want_values = _graph_and_values(expected)
    assert got_nodes == want_nodes
    assert got_values.keys() == want_values.keys()
    for name, value in want_values.items():
        assert got_values[name].dtype == value.dtype and got_values[name].shape == value.shape, name
        np.testing.assert_array_equal(got_values[name], value, err_msg=name)
