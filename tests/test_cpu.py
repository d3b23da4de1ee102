"""Integer products on whatever CPU runs the suite: every quantized op edgevl's int8 graphs use, with operands
spanning the full u8 / s8 ranges, checked against exact integer arithmetic through the session options edgevl
builds its sessions with (edgevl.cpu). On x86 without VNNI the u8 x s8 kernels saturate int16 pair sums: these
tests fail there unless edgevl switches ONNX Runtime to its exact u8 x u8 kernels."""
from __future__ import annotations

import ctypes.util
import importlib.util
import platform
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks import isa_mask
from edgevl import EdgeVL, cpu

A, W, EXACT = cpu.probe_operands()
ROWS, K = A.shape
N = W.shape[1]


def _session(graph, opset=13):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    cpu.configure_session(options)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _const(array, name):
    return numpy_helper.from_array(np.asarray(array), name)


def test_probe_model_holds_the_probe_operands():
    model = onnx.load(cpu.PROBE_MODEL)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert [n.op_type for n in model.graph.node] == ["MatMulInteger"]
    np.testing.assert_array_equal(inits["w"], W)
    assert inits["a_zero_point"] == 128


def test_probe_operands_saturate_an_int16_pair_sum():
    """The probe can only catch vpmaddubsw's saturation if some adjacent pair of u8 x s8 products exceeds int16."""
    products = A.astype(np.int64)[:, :, None] * W.astype(np.int64)[None]
    pair_sums = products[:, 0::2] + products[:, 1::2]
    assert np.abs(pair_sums).max() > np.iinfo(np.int16).max
    assert A.min() == 0 and A.max() == 255 and W.min() == -127 and W.max() == 127


def test_matmul_integer_is_exact():
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w", "azp"], ["y"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, K])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
                              [_const(W, "w"), _const(np.uint8(128), "azp")])
    np.testing.assert_array_equal(_session(graph).run(None, {"a": A})[0], EXACT)


def test_matmul_integer_to_float_is_exact():
    """The int8 decoder's per-token matmuls (export/cpu_graph.py); unit scales keep every sum an exact float."""
    graph = helper.make_graph(
        [helper.make_node("MatMulIntegerToFloat", ["a", "w", "one", "w_scale", "azp"], ["y"],
                          domain="com.microsoft")], "g",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_const(W, "w"), _const(np.float32(1), "one"), _const(np.ones(N, np.float32), "w_scale"),
         _const(np.uint8(128), "azp")])
    np.testing.assert_array_equal(_session(graph).run(None, {"a": A})[0], EXACT)


def test_dynamic_quantize_matmul_is_exact():
    """The int8 decoder's logits matmul. Activations -128..127 quantize with scale 1 and zero point 128 exactly."""
    x = A.astype(np.float32) - 128
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeMatMul", ["x", "w", "w_scale"], ["y"], domain="com.microsoft")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_const(W, "w"), _const(np.ones(N, np.float32), "w_scale")])
    np.testing.assert_array_equal(_session(graph).run(None, {"x": x})[0], EXACT)


def _qdq(x, name, dtype=np.int8, scale=1.0, axis=None):
    """QuantizeLinear + DequantizeLinear of a float tensor, symmetric: what the int8 vision graph holds."""
    extra = {"axis": axis} if axis is not None else {}
    scales = np.float32(scale) if axis is None else np.full(scale, 1.0, np.float32)
    inits = [_const(scales, f"{name}.scale"), _const(dtype(0), f"{name}.zp")]
    nodes = [helper.make_node("QuantizeLinear", [x, f"{name}.scale", f"{name}.zp"], [f"{name}.q"], **extra),
             helper.make_node("DequantizeLinear", [f"{name}.q", f"{name}.scale", f"{name}.zp"], [f"{name}.dq"],
                              **extra)]
    return nodes, inits


def test_vision_qdq_matmul_is_exact():
    """The int8 vision graph's weight MatMuls: s8 activations and per-channel s8 weights as Q/DQ, which ONNX Runtime
    fuses into integer ops (and on x86 moves to u8 activations with zero point 128: the full range again)."""
    x = A.astype(np.float32) - 128
    x[x < -127] = -127  # symmetric s8 activations: -127..127
    exact = x.astype(np.int64) @ W.astype(np.int64)
    x_nodes, x_inits = _qdq("x", "x")
    w_nodes = [helper.make_node("DequantizeLinear", ["w", "w.scale", "w.zp"], ["w.dq"], axis=1)]
    graph = helper.make_graph(
        x_nodes + w_nodes + [helper.make_node("MatMul", ["x.dq", "w.dq"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        x_inits + [_const(W, "w"), _const(np.ones(N, np.float32), "w.scale"), _const(np.zeros(N, np.int8), "w.zp")])
    np.testing.assert_array_equal(_session(graph).run(None, {"x": x})[0], exact)


def test_vision_qdq_patch_conv_is_exact():
    """The int8 vision graph's patch embedding: a Q/DQ Conv whose kernel covers the whole input (one output
    pixel per sample = one K-deep product per channel)."""
    side = 8  # K = 2 x 8 x 8 = 128 input values per output channel
    x = (A.astype(np.float32) - 128).clip(-127, 127).reshape(ROWS, 2, side, side)
    w = W.T.reshape(N, 2, side, side).copy()
    exact = x.reshape(ROWS, -1).astype(np.int64) @ w.reshape(N, -1).T.astype(np.int64)
    x_nodes, x_inits = _qdq("x", "x")
    w_nodes = [helper.make_node("DequantizeLinear", ["w", "w.scale", "w.zp"], ["w.dq"], axis=0)]
    graph = helper.make_graph(
        x_nodes + w_nodes + [helper.make_node("Conv", ["x.dq", "w.dq"], ["y"], kernel_shape=[side, side],
                                              strides=[side, side])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, 2, side, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        x_inits + [_const(w, "w"), _const(np.ones(N, np.float32), "w.scale"), _const(np.zeros(N, np.int8), "w.zp")])
    np.testing.assert_array_equal(_session(graph).run(None, {"x": x})[0].reshape(ROWS, N), exact)


def test_precision_mode_is_set_exactly_where_u8s8_saturates():
    gemm = cpu.integer_gemm()
    assert gemm.exact
    assert gemm.precision_mode == (not gemm.u8s8_exact)
    options = ort.SessionOptions()
    cpu.configure_session(options)
    if gemm.precision_mode:
        assert options.get_session_config_entry(cpu.PRECISION_MODE) == "1"
    else:
        with pytest.raises(RuntimeError, match="does not have configuration"):
            options.get_session_config_entry(cpu.PRECISION_MODE)


_X86 = platform.machine().lower() in ("x86_64", "amd64")
_VNNI = bool({"AVX-512 VNNI", "AVX-VNNI", "AMX"} & set(cpu.isa_classes()))
# Under benchmarks/isa_mask.py ONNX Runtime sees a smaller CPU than edgevl.cpu does: the mask's class.
if isa_mask.active_class():
    _VNNI = _VNNI and "avx512_vnni" not in isa_mask.CLASSES[isa_mask.active_class()][0]


@pytest.mark.skipif(not (_X86 and _VNNI), reason="checks the VNNI/AMX class: this CPU has no VNNI or is not x86")
@pytest.mark.parametrize("named", [None, "avx2", "avx512-vnni", "amx"])
def test_vnni_cpus_keep_the_fast_u8s8_kernels(named, monkeypatch):
    """u8 x s8 stays on MLAS's kernels; decoders run on edgevl's ops where those are faster: on AVX-512 VNNI without
    AMX int4 always and int8 on Int8MatMul's VNNI kernels, on AMX both on the ops' AMX kernels (the widest, unless
    EDGEVL_MATMUL_KERNEL names slower ones), none on AVX-VNNI."""
    if named is not None and named not in cpu.int8_matmul_kernels():
        pytest.skip(f"Int8MatMul's {named} kernels need a CPU with it; this one runs {cpu.int8_matmul_kernels()}")
    if named is not None:
        monkeypatch.setenv(cpu.MATMUL_KERNEL_ENV, named)
    cpu.integer_gemm.cache_clear()
    try:
        gemm = cpu.integer_gemm()
        assert gemm.u8s8_exact and not gemm.precision_mode
        kernel = cpu.int8_matmul_kernel()
        expected = {"AVX-512 VNNI": (("int8",) if kernel == "avx512-vnni" else ()) + ("int4",),
                    "AMX": ("int8", "int4") if kernel == "amx" else ()}.get(gemm.kernel, ())
        expected = expected if cpu.matmul_library() is not None else ()
        assert gemm.edgevl_decoders == expected
        assert gemm.edgevl_matmul is (True if expected else None)
        if "int4" in expected:
            assert f"Int4MatMul ({kernel} kernels)" in gemm.describe()
        if "int8" in expected:
            assert f"Int8MatMul ({kernel} kernels)" in gemm.describe()
        # int8 vision attention in bf16 where the ops take AMX and the CPU has AMX-BF16 (vision_amx.onnx)
        tiles = kernel == "amx" and "AMX-BF16" in cpu.isa_classes() and cpu.matmul_library() is not None
        assert gemm.vision_attention == ("AMX-BF16" if tiles else None)
        assert ("vision attention in bf16" in gemm.describe()) == tiles
    finally:
        monkeypatch.undo()
        cpu.integer_gemm.cache_clear()


@pytest.mark.skipif(cpu.matmul_library() is None or "avx512-vnni" not in cpu.int8_matmul_kernels(),
                    reason="needs edgevl's Int8MatMul with its AVX-512 VNNI kernels (an AVX-512 VNNI or AMX CPU)")
def test_an_amx_cpu_refused_its_tile_state_takes_the_vnni_class_choice(monkeypatch):
    """/proc/cpuinfo says AMX, but the ops found no AMX (Linux refused the tile state): neither they nor MLAS use
    it, so the decoders are chosen as on AVX-512 VNNI, not left on MLAS's chain for want of AMX kernels."""
    monkeypatch.setattr(cpu, "isa_classes", lambda: ("AVX2", "AVX-512", "AVX-512 VNNI", "AMX"))
    monkeypatch.setattr(cpu, "int8_matmul_kernels", lambda: ("avx2", "avx512-vnni"))
    monkeypatch.delenv(cpu.MATMUL_KERNEL_ENV, raising=False)
    cpu.integer_gemm.cache_clear()
    try:
        gemm = cpu.integer_gemm()
        assert gemm.kernel == "AVX-512 VNNI" and gemm.edgevl_kernel == "avx512-vnni"
        assert gemm.edgevl_decoders == ("int8", "int4")
        assert "Int8MatMul (avx512-vnni kernels)" in gemm.describe()
    finally:
        monkeypatch.undo()
        cpu.integer_gemm.cache_clear()


@pytest.mark.skipif(not _X86 or _VNNI or "AVX2" not in cpu.isa_classes(),
                    reason="checks the AVX2-without-VNNI class: this CPU is not one")
def test_avx2_cpus_without_vnni_switch_to_exact_kernels():
    gemm = cpu.integer_gemm()
    assert not gemm.u8s8_exact and gemm.precision_mode and gemm.exact
    assert gemm.edgevl_matmul is (True if cpu.matmul_library() else None)
    assert gemm.edgevl_decoders == (("int8", "int4") if cpu.matmul_library() else ())


def test_isa_classes_come_from_the_kernels_flags():
    isa = cpu.isa_classes()
    assert set(isa) <= set(cpu.ISA_NAMES)
    if _X86 and platform.system() == "Linux":
        assert "AVX2" in isa  # every machine class this project runs on has at least AVX2


@pytest.mark.skipif(cpu._cpuid_classes() is None, reason="needs edgevl's library (x86-64), which asks cpuid")
def test_x86_isa_classes_are_cpuids_where_the_library_is_else_proc_cpuinfos(monkeypatch):
    """cpuid is what the kernels and MLAS act on; /proc/cpuinfo says the same natively, and the host's CPU under
    user-mode emulation (qemu -cpu Haswell), where cpuid's classes are the emulated CPU's: fewer."""
    assert cpu.isa_classes() == cpu._cpuid_classes()
    assert set(cpu._cpuid_classes()) <= set(cpu._cpuinfo_classes())
    # a library built before it reported the classes: /proc/cpuinfo's
    monkeypatch.setattr(cpu, "_library_file", lambda: Path(ctypes.util.find_library("c")))
    cpu.isa_classes.cache_clear()
    try:
        assert cpu._cpuid_classes() is None
        assert cpu.isa_classes() == cpu._cpuinfo_classes()
    finally:
        monkeypatch.undo()
        cpu.isa_classes.cache_clear()


def test_without_the_kernels_package_there_is_no_library(monkeypatch):
    """edgevl/ alone on the path (as an aarch64 Python running a checkout has it): no library, and no error."""
    def missing(name, package=None):
        raise ModuleNotFoundError(f"No module named {name.rpartition('.')[0]!r}")

    monkeypatch.setattr(importlib.util, "find_spec", missing)
    assert cpu._library_file() is None


def test_int8_backend_records_its_integer_path_and_refuses_an_inexact_one(exported, monkeypatch):
    out = exported("qwen2", "int8")
    assert EdgeVL.from_pretrained(out).backend.integer_gemm == cpu.integer_gemm()
    assert EdgeVL.from_pretrained(exported("qwen2", "fp32")).backend.integer_gemm is None
    broken = cpu.IntegerGemm("AVX2 (vpmaddubsw)", u8s8_exact=False, precision_mode=True, exact=False)
    monkeypatch.setattr("edgevl.backends.onnxruntime_backend.integer_gemm", lambda: broken)
    with pytest.raises(RuntimeError, match="cannot compute its integer products exactly"):
        EdgeVL.from_pretrained(out)


needs_edgevl_matmul = pytest.mark.skipif(
    cpu.matmul_library() is None, reason="edgevl's Int8MatMul / Int4MatMul are not installed or cannot run here "
    "(x86-64 with AVX2 and FMA, a C compiler when edgevl was installed)")


def _edgevl_matmul_session(model, threads=1):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(cpu.matmul_library()))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_matmul_probe_model_holds_the_probe_operands():
    model = onnx.load(cpu.MATMUL_PROBE_MODEL)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    int8, int4 = model.graph.node
    assert (int8.domain, int8.op_type, helper.get_node_attr_value(int8, "per_token")) == ("edgevl", "Int8MatMul", 0)
    np.testing.assert_array_equal(inits["w"], W)
    np.testing.assert_array_equal(inits["w_scale"], np.ones(N, np.float32))
    assert (int4.domain, int4.op_type, list(int4.input)) == ("edgevl", "Int4MatMul", ["x4", "codes", "scales"])
    assert {a.name: helper.get_attribute_value(a) for a in int4.attribute} == {"K": 128, "N": N, "block_size": 128}
    x4, codes, exact4 = cpu.int4_probe_operands()
    np.testing.assert_array_equal(inits["codes"], codes)
    np.testing.assert_array_equal(inits["scales"], np.ones((N, 1), np.float32))
    # The probe's activations quantize to themselves (127 in every row: scale 1), and its codes span 0..15.
    assert np.all(np.abs(x4).max(1) == 127) and np.abs(x4).max() <= 127
    values = np.stack([codes & 15, codes >> 4], -1).reshape(N, 128)
    assert values.min() == 0 and values.max() == 15
    np.testing.assert_array_equal(exact4, x4 @ (values.astype(np.int64) - 8).T)


@needs_edgevl_matmul
@pytest.mark.parametrize("threads", [1, 2])
def test_edgevl_matmuls_are_exact(threads, int8_kernel):
    """edgevl's own ops (kernels/ort_matmul.c), whatever ONNX Runtime's kernels do here: Int8MatMul's activations
    -128..127 quantize to their own codes (scale 1, zero point 128), Int4MatMul's -127..127 with 127 in each row
    to themselves (scale 1), so the outputs are the exact integers."""
    session = _edgevl_matmul_session(onnx.load(cpu.MATMUL_PROBE_MODEL), threads)
    feeds, exact = cpu.matmul_probe_feeds()
    np.testing.assert_array_equal(feeds["x8"][4:8], A.astype(np.float32) - 128)
    np.testing.assert_array_equal(exact["y8"][4:8], EXACT)
    for name, y in zip(exact, session.run(list(exact), feeds)):
        np.testing.assert_array_equal(y, exact[name])
    assert cpu.integer_gemm().edgevl_matmul in (None, True)  # None: this class keeps ONNX Runtime's kernels


def _int8_matmul_model(weight, weight_as_input=False):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, weight.shape[0]])]
    inits = [_const(np.ones(weight.shape[1], np.float32), "w_scale")]
    if weight_as_input:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.INT8, list(weight.shape)))
    else:
        inits.append(_const(weight, "w"))
    graph = helper.make_graph(
        [helper.make_node("Int8MatMul", ["x", "w", "w_scale"], ["y"], name="layer.mlp", domain="edgevl", per_token=1)],
        "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("edgevl", 1)])


@needs_edgevl_matmul
def test_int8_matmul_refuses_weights_it_cannot_compute_exactly(monkeypatch):
    """-128 has no positive counterpart for the sign trick, the weight is packed once, an input must match the
    weight's K, and EDGEVL_MATMUL_KERNEL must name kernels this CPU runs: each is an error that names the node, never a
    wrong product."""
    weight = W.copy()
    weight[3, 5] = -128
    with pytest.raises(Exception, match=r"layer\.mlp.*-127\.\.127"):
        _edgevl_matmul_session(_int8_matmul_model(weight))
    with pytest.raises(Exception, match=r"layer\.mlp.*constant initializers"):
        _edgevl_matmul_session(_int8_matmul_model(W, weight_as_input=True))
    monkeypatch.setenv(cpu.MATMUL_KERNEL_ENV, "avx9")
    with pytest.raises(Exception, match=r"layer\.mlp.*EDGEVL_MATMUL_KERNEL=avx9: expected avx2, avx512-vnni or amx"):
        _edgevl_matmul_session(_int8_matmul_model(W))
    monkeypatch.delenv(cpu.MATMUL_KERNEL_ENV)
    unchecked = _int8_matmul_model(W)
    unchecked.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "k"  # so the op itself sees a wrong K
    session = _edgevl_matmul_session(unchecked)
    with pytest.raises(Exception, match=rf"layer\.mlp.*last dimension is 7, the weight's K {W.shape[0]}"):
        session.run(None, {"x": np.ones((2, 7), np.float32)})
