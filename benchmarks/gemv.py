"""The int8 weight matmul of a decode step, in each formulation ONNX Runtime offers, and the int4 export's beside
them, on this CPU (`python -m benchmarks gemv`): which are exact here, and how fast each streams a decoder's weights.

A decode step multiplies one row of activations by every weight matrix once, so its speed is how fast the kernel
streams int8 weights. Timed over the MLP matrices of a model shape (24 x [896, 9728] and [4864, 896] at InternVL2-1B:
314 MB, more than any cache), in one session, rows of random operands; exactness is a separate 128-deep product
with operands spanning each formulation's full ranges (edgevl.cpu.probe_operands), against numpy's integers.

- u8s8: MatMulIntegerToFloat, u8 activations (zero point 128) x s8 weights: the int8 export's graph, as ONNX Runtime
  runs it by default. Exact with VNNI, AMX and on ARM; x86 without VNNI saturates (edgevl.cpu).
- u8u8: the same graph with session.x64quantprecision: what edgevl runs on x86 without VNNI.
- u8s8-7bit: activations in 0..127 (zero point 64) x s8 weights: exact on every class, one bit of activation
  precision less than the export's. Not what edgevl runs (benchmarks/RESULTS.md, "int8 decode on the AVX2 class").
- edgevl: edgevl's own Int8MatMul op (kernels/ort_matmul.c: the sign trick on AVX2, vpdpbusd on AVX-512 VNNI,
  tdpbusd on AMX from 16 rows; exact with full-range operands): what edgevl's int8 decoders run on x86 where it is
  installed (EDGEVL_MATMUL_KERNEL=avx2 times its AVX2 kernels on a VNNI machine). Timed here with its per-tensor
  activations (the lm_head's scheme; the export's other matmuls quantize per token, on the same integer kernel).
- nbits8: MatMulNBits, 8-bit weights in blocks of 128, accuracy_level 4 (int8 compute; onnxruntime-genai's int8
  uses blocks of 32): it quantizes the activations itself, per block, so it has no exact integer product to check.
- nbits4, edgevl-int4: the int4 export's matmul, 4-bit weights in blocks of 128 (half the bytes): MatMulNBits
  (decoder.onnx) and edgevl's Int4MatMul (decoder_avx2.onnx, what x86 without VNNI runs); no integer product either.
"""
from __future__ import annotations

import time

import numpy as np

FORMULATIONS = ("u8s8", "u8u8", "u8s8-7bit", "edgevl", "nbits8", "nbits4", "edgevl-int4")
_EDGEVL_OPS = ("edgevl", "edgevl-int4")
_INT4 = ("nbits4", "edgevl-int4")


def available_formulations() -> tuple[str, ...]:
    """FORMULATIONS less edgevl's own ops where this install or CPU lacks them (edgevl.cpu.matmul_library)."""
    from edgevl.cpu import matmul_library

    return tuple(f for f in FORMULATIONS if f not in _EDGEVL_OPS or matmul_library() is not None)
_NBITS_BLOCK = 128
# formulation -> (activation zero point, activation values are halved into 0..127, session.x64quantprecision)
_INTEGER = {"u8s8": (128, False, False), "u8u8": (128, False, True), "u8s8-7bit": (64, True, False)}


def _model(formulation: str, shapes: list[tuple[int, int]], weights: list[np.ndarray] | None, rows: int):
    """One session input per distinct K ("x<K>": uint8 for the integer formulations, float for the others), one
    node and one output per weight matrix. weights: int8 [K, N] each (None: random ones; the int4 formulations'
    are always random codes). edgevl's Int8MatMul quantizes per tensor here (DynamicQuantizeMatMul's scheme), so
    float(a - 128) feeds it a's codes exactly."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes = [], []
    integer = formulation in _INTEGER
    if integer:
        inits += [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
                  numpy_helper.from_array(np.array(_INTEGER[formulation][0], np.uint8), "a_zero_point")]
    for i, (k, n) in enumerate(shapes):
        w = weights[i] if weights is not None else rng.integers(-127, 128, (k, n), dtype=np.int8)
        if integer:
            inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.ones(n, np.float32), f"s{i}")]
            nodes.append(helper.make_node("MatMulIntegerToFloat", [f"x{k}", f"w{i}", "one", f"s{i}", "a_zero_point"],
                                          [f"y{i}"], domain="com.microsoft"))
        elif formulation == "edgevl":
            inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.ones(n, np.float32), f"s{i}")]
            nodes.append(helper.make_node("Int8MatMul", [f"x{k}", f"w{i}", f"s{i}"], [f"y{i}"], domain="edgevl",
                                          per_token=0))
        elif formulation in _INT4:  # [N, K / block, block / 2]: two 4-bit codes a byte, zero point 8
            blocks = k // _NBITS_BLOCK
            inits += [numpy_helper.from_array(rng.integers(0, 256, (n, blocks, _NBITS_BLOCK // 2), dtype=np.uint8),
                                              f"w{i}"),
                      numpy_helper.from_array(np.full((n, blocks), 1e-3, np.float32), f"s{i}")]
            op, domain, attrs = (("MatMulNBits", "com.microsoft", {"bits": 4, "accuracy_level": 4})
                                 if formulation == "nbits4" else ("Int4MatMul", "edgevl", {}))
            nodes.append(helper.make_node(op, [f"x{k}", f"w{i}", f"s{i}"], [f"y{i}"], domain=domain, K=k, N=n,
                                          block_size=_NBITS_BLOCK, **attrs))
        else:  # MatMulNBits: [N, K / block, block] unsigned codes (zero point 128 by default), a scale per block
            blocks = k // _NBITS_BLOCK
            codes = (w.T.astype(np.int16) + 128).astype(np.uint8).reshape(n, blocks, _NBITS_BLOCK)
            inits += [numpy_helper.from_array(codes, f"w{i}"),
                      numpy_helper.from_array(np.ones(n * blocks, np.float32), f"s{i}")]
            nodes.append(helper.make_node("MatMulNBits", [f"x{k}", f"w{i}", f"s{i}"], [f"y{i}"],
                                          domain="com.microsoft", K=k, N=n, bits=8, block_size=_NBITS_BLOCK,
                                          accuracy_level=4))
    dtype = TensorProto.UINT8 if integer else TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(f"x{k}", dtype, [rows, k]) for k in sorted({k for k, _ in shapes})]
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(shapes))]
    graph = helper.make_graph(nodes, formulation, inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
                                                   helper.make_opsetid("edgevl", 1)])


def _session(formulation: str, model, threads: int | None):
    import onnxruntime as ort

    from edgevl.cpu import PRECISION_MODE, matmul_library

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    if formulation in _EDGEVL_OPS:
        library = matmul_library()
        if library is None:
            raise RuntimeError(f"the {formulation} formulation needs edgevl's own ops, which this install or CPU "
                               "lacks (x86-64 with AVX2, and a C compiler when edgevl was installed)")
        options.register_custom_ops_library(str(library))
    precision_mode = formulation in _INTEGER and _INTEGER[formulation][2]
    options.add_session_config_entry(PRECISION_MODE, "1" if precision_mode else "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _activations(formulation: str, a: np.ndarray) -> np.ndarray:
    return a >> 1 if _INTEGER[formulation][1] else a


def probe_error(formulation: str) -> int | None:
    """Largest error of the formulation's product of full-range operands against exact integers (0: exact); None
    for the MatMulNBits-style ones, which have no integer product."""
    from edgevl.cpu import probe_operands

    if formulation not in (*_INTEGER, "edgevl"):  # the int4 ops' probe: edgevl.cpu, tests/test_cpu.py
        return None
    a, w, _ = probe_operands()
    if formulation == "edgevl":
        exact = (a.astype(np.int64) - 128) @ w.astype(np.int64)
        x = a.astype(np.float32) - 128  # spans -128..127: DynamicQuantizeLinear's scale 1, zero point 128
    else:
        a = x = _activations(formulation, a)
        exact = (a.astype(np.int64) - _INTEGER[formulation][0]) @ w.astype(np.int64)
    session = _session(formulation, _model(formulation, [w.shape], [w], len(a)), threads=1)
    got = session.run(None, {f"x{w.shape[0]}": x})[0]
    return int(np.abs(got.astype(np.int64) - exact).max())


def weight_shapes(shape: str, layers: int | None = None) -> list[tuple[int, int]]:
    """[K, N] of each MLP weight matrix of a known model shape (gate+up packed, down), `layers` of them."""
    from edgevl.specs import KNOWN_SPECS

    decoder = KNOWN_SPECS[shape].decoder
    pair = [(decoder.hidden_size, 2 * decoder.intermediate_size), (decoder.intermediate_size, decoder.hidden_size)]
    return pair * (layers or decoder.num_layers)


def time_formulation(formulation: str, shapes: list[tuple[int, int]], rows: int, repeat: int,
                     threads: int | None) -> dict:
    """Median seconds of one pass over every matrix, after a warm-up pass."""
    session = _session(formulation, _model(formulation, shapes, None, rows), threads)
    rng = np.random.default_rng(1)
    feed = {i.name: (_activations(formulation, rng.integers(0, 256, i.shape, dtype=np.uint8))
                     if formulation in _INTEGER else rng.standard_normal(i.shape, dtype=np.float32))
            for i in session.get_inputs()}
    session.run(None, feed)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return {"s": float(np.median(times)), "min_s": min(times), "max_s": max(times)}


def measure(shape: str, rows: int = 1, repeat: int = 20, threads: int | None = None, layers: int | None = None,
            formulations=None, log=print) -> dict:
    from .machine import describe

    shapes = weight_shapes(shape, layers)
    weight_bytes = sum(k * n for k, n in shapes)
    results = {}
    for formulation in formulations or available_formulations():
        log(f"[gemv] {formulation} ...")
        timing = time_formulation(formulation, shapes, rows, repeat, threads)
        streamed = weight_bytes / 2 if formulation in _INT4 else weight_bytes
        results[formulation] = {**timing, "gb_per_s": streamed / timing["s"] / 1e9,
                                "probe_error": probe_error(formulation)}
    return {"shape": shape, "rows": rows, "matrices": len(shapes), "weight_bytes": weight_bytes,
            "repeat": repeat, "threads": threads, "machine": describe(), "formulations": results}


def format_gemv(result: dict) -> str:
    from .report import machine_line

    lines = [f"Weight matmuls, {result['rows']} row(s) x {result['matrices']} matrices of the {result['shape']} "
             f"MLP ({result['weight_bytes'] / 1e6:.0f} MB of int8 weights, half that at int4), median of "
             f"{result['repeat']}",
             f"machine: {machine_line(result['machine'])}", "",
             "| formulation | ms per pass [min-max] | weight GB/s | probe product |", "|---|---:|---:|---|"]
    for name, r in result["formulations"].items():
        error = r["probe_error"]
        exact = "—" if error is None else "exact" if error == 0 else f"wrong (max error {error})"
        lines.append(f"| {name} | {r['s'] * 1e3:.2f} [{r['min_s'] * 1e3:.2f}-{r['max_s'] * 1e3:.2f}] | "
                     f"{r['gb_per_s']:.1f} | {exact} |")
    return "\n".join(lines)
