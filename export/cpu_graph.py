"""Rewrites of the exported graphs for ONNX Runtime on CPU: the int8/int4 exports' decoder.onnx and vision.onnx. They
use ONNX Runtime's own ops, so TensorRT never reads these graphs (`edgevl build` starts from an fp32 export).

- `quantize_matmuls_per_token`: int8 weights per output channel, activations quantized per token at run time,
  computed by MatMulIntegerToFloat. ONNX Runtime runs that u8 x s8 product on MLAS's integer GEMM (AMX / VNNI):
  measured on the project's 2-core Xeon over the 97 weight matmuls of Qwen2-0.5B, prefill of 662 tokens 0.47 s
  against 2.4 s for MatMulNBits int8 (block 32, accuracy_level 4), and one decode token 22.9 ms against 24.5 ms.
  Per token, not per tensor (DynamicQuantizeMatMul everywhere decodes ~1 ms a step faster, benchmarks/RESULTS.md,
  but costs prefill accuracy): a prompt's outlier tokens (the "attention sink" rows, 10-1000x the others in
  down_proj's input on Qwen2) would otherwise set the scale of every row and flatten them to a few levels. The
  logits' MatMul only ever sees one row, so it is the DynamicQuantizeMatMul.
- `use_edgevl_int8_matmul`: the same int8 decoder with each of those matmuls as edgevl's own Int8MatMul op
  (kernels/ort_matmul.c), for x86 without VNNI, where ONNX Runtime's exact path is its slower u8 x u8 kernels,
  AVX-512 VNNI, where its VNNI kernels decode faster than MLAS's, and AMX, where its AMX kernels also prefill faster.
  The same integers and the same float arithmetic around them: its outputs are the graph's, bit for bit.
- `use_edgevl_int4_matmul`: the int4 decoder with each MatMulNBits as edgevl's Int4MatMul, for the same CPUs: the
  same arithmetic on a kernel that decodes faster than MLAS's; outputs agree to float rounding.
- `use_edgevl_attention`: in the same graphs, each GroupQueryAttention as edgevl's (kernels/ort_attention.c): ONNX
  Runtime's kernel for prompts and prefill chunks, bit for bit, and edgevl's for the one-row decode step, which reads
  each KV head's cache once for all its query heads; the step's outputs agree to float rounding. In the vision
  graph (vision_amx.onnx), each MultiHeadAttention as edgevl's: bf16 on AMX tiles, ONNX Runtime's kernel elsewhere.
- `fuse_matmul_epilogues`: in the same graphs, the bias, SwiGLU and residual Adds after each of edgevl's matmuls
  folded into it (the same arithmetic: the outputs are the graph's bit for bit), 7 nodes a decoder layer, not 13.
- `fuse_rms_norm`: the exported RMSNorm (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul) as one
  SimplifiedLayerNormalization node; ONNX Runtime's own fusion matches only the Div form.
- `fuse_attention`: each layer's attention as one GroupQueryAttention node (RoPE inside), whose past and present
  can be one buffer written in place (the manifest's "shared" KV layout): no per-step copy of the cache. Phi-3's
  LongRoPE included: the step's cos/sin tables are chosen in the graph, from its positions.
- `drop_matmul_output_requantization`, `fuse_vision_attention`, `fuse_gelu`: the calibrated static Q/DQ vision
  graph with each weight MatMul's output left fp32 (MatMulIntegerToFloat), each InternViT attention as one
  MultiHeadAttention and each GELU as one Gelu (export/quantize.py, fuse_cpu_vision).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .initializers import Initializers
from .quantizer import symmetric_weights
from .memory import progress

MIN_WEIGHT_ELEMENTS = 1 << 12  # smaller MatMul weights (none in a real model) stay fp32
_ZERO_POINT = 128  # symmetric per-token scale, shifted into uint8: MLAS's fast GEMM is u8 x s8
# The decoder's RoPE buffers (modeling.Rope), as export/graphs.py's wrapper names them: the frequencies (LongRoPE's
# short ones) and LongRoPE's long ones.
ROPE_INV_FREQ, ROPE_INV_FREQ_LONG = "lm.rope.inv_freq", "lm.rope.inv_freq_long"


def _initializers(graph) -> dict:
    return {t.name: t for t in graph.initializer}


def _consumers(graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _scalar(inits: dict, name: str, data: Initializers):
    t = inits.get(name)
    if t is None or int(np.prod(t.dims)) != 1:
        return None
    return data.array(t).item()


def quantize_matmuls_per_token(model: onnx.ModelProto, data: Initializers | None = None, log=None) -> int:
    """Replace each MatMul(x, W) with a constant 2-D W by int8 weights Wq = round(W / w_scale), w_scale =
    max(|W|, axis 0) / 127, and activations quantized per token:
        m = max(|x|, last axis);  y = MatMulIntegerToFloat(round(127 x / m) + 128, Wq, 1/127, w_scale, 128) * m
    (m rides outside the integer product because MatMulIntegerToFloat takes one activation scale per tensor).
    An all-zero row makes 0 / 0 quantize to some finite code, and the final * m = 0 still zeroes it exactly. A
    MatMul whose output is a one-row graph output (the last position's logits) is one DynamicQuantizeMatMul
    instead: per tensor is per token there, and one fused node replaces six. In place; returns how many.
    `data` reads the weights and stores the new ones (default: in the graph); `log`, when given, gets progress."""
    graph, data = model.graph, data or Initializers()
    inits = _initializers(graph)
    single_row = _one_row_outputs(graph)
    nodes, done, replaced = [], set(), 0
    for node in graph.node if log is None else progress(list(graph.node), len(graph.node), "int8 weights", log):
        w = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if w is None or len(w.dims) != 2 or int(np.prod(w.dims)) < MIN_WEIGHT_ELEMENTS:
            nodes.append(node)
            continue
        if w.name not in done:  # a weight shared by two MatMuls is quantized once
            q, scale = symmetric_weights(data.array(w), 8)
            data.new(graph, q, f"{w.name}.int8")
            data.new(graph, scale, f"{w.name}.scale")
            del q
            done.add(w.name)
        x, y, p = node.input[0], node.output[0], f"{node.name or node.output[0]}.pt"
        if y in single_row:
            nodes.append(helper.make_node("DynamicQuantizeMatMul", [x, f"{w.name}.int8", f"{w.name}.scale"], [y],
                                          name=f"{p}.mm", domain="com.microsoft"))
        else:
            nodes += [
                helper.make_node("Abs", [x], [f"{p}.abs"], name=f"{p}.abs"),
                helper.make_node("ReduceMax", [f"{p}.abs", "pt.axes"], [f"{p}.max"], keepdims=1, name=f"{p}.max"),
                helper.make_node("Div", [x, f"{p}.max"], [f"{p}.unit"], name=f"{p}.unit"),
                helper.make_node("QuantizeLinear", [f"{p}.unit", "pt.inv127", "pt.zero_point"], [f"{p}.q"],
                                 name=f"{p}.q"),
                helper.make_node("MatMulIntegerToFloat", [f"{p}.q", f"{w.name}.int8", "pt.inv127",
                                                          f"{w.name}.scale", "pt.zero_point"], [f"{p}.mm"],
                                 name=f"{p}.mm", domain="com.microsoft"),
                helper.make_node("Mul", [f"{p}.mm", f"{p}.max"], [y], name=f"{p}.out"),
            ]
        replaced += 1
    if replaced:
        graph.initializer.extend([numpy_helper.from_array(np.array([-1], np.int64), "pt.axes"),
                                  numpy_helper.from_array(np.array(1 / 127, np.float32), "pt.inv127"),
                                  numpy_helper.from_array(np.array(_ZERO_POINT, np.uint8), "pt.zero_point")])
        _replace_nodes(graph, nodes)
        _drop_unused_initializers(graph)
        _use_domain(model)
    return replaced


EDGEVL_DOMAIN = "edgevl"  # the custom-op domain of edgevl's ONNX Runtime ops (kernels/ort_ops.c)


def use_edgevl_int8_matmul(model: onnx.ModelProto) -> int:
    """Replace each per-token chain of quantize_matmuls_per_token (Abs, ReduceMax, Div, QuantizeLinear,
    MatMulIntegerToFloat, Mul) with Int8MatMul(x, Wq, w_scale, per_token=1), and each DynamicQuantizeMatMul with
    Int8MatMul(x, Wq, w_scale, per_token=0): one node computing the same quantization, integers and scaling
    (kernels/ort_matmul.c). In place; returns how many. The weights stay the graph's initializers, so a copy of the
    graph can share its data file with the original."""
    graph = model.graph
    inits = _initializers(graph)
    producer = _Producers(graph)
    consumers = _consumers(graph)
    replace, remove = {}, set()
    for node in graph.node:
        if node.op_type == "DynamicQuantizeMatMul" and len(node.input) == 3 and node.input[1] in inits:
            replace[id(node)] = _int8_matmul(node.input, node.output[0], node.name, per_token=0)
            continue
        if node.op_type != "MatMulIntegerToFloat" or node.input[2:] != ["pt.inv127", node.input[3], "pt.zero_point"]:
            continue
        q = producer.made_by(node.input[0], "QuantizeLinear")
        unit = q and producer.made_by(q.input[0], "Div")
        peak = unit and producer.made_by(unit.input[1], "ReduceMax")
        absolute = peak and producer.made_by(peak.input[0], "Abs")
        users = consumers.get(node.output[0], [])
        out = users[0] if len(users) == 1 and users[0].op_type == "Mul" else None
        if (absolute is None or out is None or absolute.input[0] != unit.input[0]
                or sorted(out.input) != sorted([node.output[0], peak.output[0]])
                or any(len(consumers.get(n.output[0], [])) != 1 for n in (absolute, unit, q))
                or len(consumers.get(peak.output[0], [])) != 2):
            continue
        remove.update(id(n) for n in (absolute, peak, unit, q, node))
        replace[id(out)] = _int8_matmul([unit.input[0], node.input[1], node.input[3]], out.output[0],
                                        node.name.removesuffix(".mm"), per_token=1)
    if not replace:
        return 0
    _replace_nodes(graph, [replace.get(id(n), n) for n in graph.node if id(n) not in remove])
    _drop_unused_initializers(graph)
    _use_domain(model, EDGEVL_DOMAIN)
    return len(replace)


def use_edgevl_int4_matmul(model: onnx.ModelProto) -> int:
    """Replace each MatMulNBits the int4 export makes (4 bits, symmetric: no zero points, no bias; blocks of 32, 64
    or 128) with Int4MatMul(x, w, scales): MatMulNBits' int8-compute arithmetic on edgevl's faster AVX2 kernel
    (kernels/ort_matmul.c), whose outputs agree with MatMulNBits' to float rounding. In place; returns how many. The
    weights stay the graph's initializers, as in use_edgevl_int8_matmul."""
    replaced = 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "MatMulNBits" or len(node.input) != 3 or attrs.get("bits") != 4
                or attrs.get("block_size") not in (32, 64, 128)):
            continue
        node.op_type, node.domain = "Int4MatMul", EDGEVL_DOMAIN
        del node.attribute[:]
        node.attribute.extend(helper.make_attribute(key, attrs[key]) for key in ("K", "N", "block_size"))
        replaced += 1
    if replaced:
        _use_domain(model, EDGEVL_DOMAIN)
    return replaced


def use_edgevl_attention(model: onnx.ModelProto, op: str = "GroupQueryAttention") -> int:
    """Each com.microsoft `op` as edgevl's (kernels/ort_attention.c), the same inputs, outputs and attributes:
    GroupQueryAttention (fuse_attention's) with the decode step on edgevl's kernel; MultiHeadAttention
    (fuse_vision_attention's) on AMX-BF16 tiles where the CPU has them. In place; returns how many."""
    replaced = 0
    for node in model.graph.node:
        if node.op_type == op and node.domain == "com.microsoft":
            node.domain = EDGEVL_DOMAIN
            replaced += 1
    if replaced:
        _use_domain(model, EDGEVL_DOMAIN)
    return replaced


def fuse_matmul_epilogues(model: onnx.ModelProto, data: Initializers | None = None) -> int:
    """Fold what follows each of edgevl's matmuls in a decoder layer into it (kernels/ort_matmul.c, the epilogue), in
    this order: an Add of a constant [N] (the bias, input 3); a Split into halves on the last axis whose first half
    goes through SiLU (Sigmoid, Mul) and is multiplied by the second (swiglu=1); an Add of a tensor of the output's
    shape (the residual, input 4). Only where nothing else reads what is folded and the shapes are the graph's known
    ones (value_info). The op computes each in the replaced nodes' float arithmetic, so the graph's outputs are the
    same bit for bit, from 13 nodes a decoder layer to 7. In place; returns how many nodes were folded."""
    graph, data = model.graph, data or Initializers()
    inits = _initializers(graph)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in (*graph.value_info, *graph.input, *graph.output) if v.type.tensor_type.HasField("shape")}
    readers = _Readers(graph)
    remove, folded = set(), 0
    for node in graph.node:
        if node.domain != EDGEVL_DOMAIN or node.op_type not in ("Int8MatMul", "Int4MatMul") or len(node.input) != 3:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        n = attrs["N"] if node.op_type == "Int4MatMul" else inits[node.input[1]].dims[1]
        out, bias, residual, chain = node.output[0], "", "", []
        add = readers.only(out, "Add")
        other = add and readers.other_input(add, out)
        if other in inits and list(inits[other].dims) == [n] and inits[other].data_type == onnx.TensorProto.FLOAT:
            bias, out = other, add.output[0]
            chain.append(add)
        swiglu = _swiglu(readers.only(out, "Split"), out, n, shapes, inits, readers, data)
        if swiglu:
            out = swiglu[-1].output[0]
            chain += swiglu
        add = readers.only(out, "Add")
        other = add and readers.other_input(add, out)
        if other and other not in inits and shapes.get(other) is not None \
                and shapes.get(other) == shapes.get(out) == shapes.get(add.output[0]):
            residual, out = other, add.output[0]
            chain.append(add)
        if not chain:
            continue
        node.input.extend([bias, residual] if residual else [bias] if bias else [])
        node.output[0] = out
        if swiglu:
            node.attribute.append(helper.make_attribute("swiglu", 1))
        remove.update(id(folded_node) for folded_node in chain)
        folded += len(chain)
    if folded:
        _replace_nodes(graph, [n for n in graph.node if id(n) not in remove])
    return folded


class _Producers(dict):
    """Which node writes each tensor (a dict), and `made_by`: that node where it is an `op_type` of the default
    domain."""

    def __init__(self, graph):
        super().__init__((out, n) for n in graph.node for out in n.output)

    def made_by(self, name: str, op_type: str):
        node = self.get(name)
        return node if node is not None and (node.domain, node.op_type) == ("", op_type) else None


class _Readers:
    """Which nodes read each tensor; a graph output counts as a reader the rewrites cannot remove."""

    def __init__(self, graph):
        self.of = _consumers(graph)
        self.outputs = {o.name for o in graph.output}

    def all(self, name: str) -> list:
        return [] if name in self.outputs else self.of.get(name, [])

    def only(self, name: str, op_type: str):
        users = self.all(name)
        return users[0] if len(users) == 1 and (users[0].domain, users[0].op_type) == ("", op_type) else None

    @staticmethod
    def other_input(node, name: str) -> str | None:
        """The other input of a two-input node that reads `name` once."""
        if len(node.input) != 2 or list(node.input).count(name) != 1:
            return None
        return node.input[1] if node.input[0] == name else node.input[0]


def _swiglu(split, x: str, n: int, shapes: dict, inits: dict, readers: _Readers, data: Initializers) -> list | None:
    """Split(x) into halves a, b on the last axis, then Mul(Mul(a, Sigmoid(a)), b): those nodes, or None."""
    if split is None or len(split.output) != 2 or n % 2 or shapes.get(x) is None:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in split.attribute}
    sizes = split.input[1] if len(split.input) > 1 and split.input[1] else None  # opset 13 on; before, an attribute
    halves = [n // 2, n // 2]
    if (attrs.get("axis", 0) not in (-1, len(shapes[x]) - 1) or list(attrs.get("split", halves)) != halves
            or (sizes and (sizes not in inits or data.array(inits[sizes]).tolist() != halves))):
        return None
    gate, up = split.output
    users = readers.all(gate)
    sigmoid = next((u for u in users if (u.domain, u.op_type) == ("", "Sigmoid")), None)
    silu = sigmoid and readers.only(sigmoid.output[0], "Mul")
    if len(users) != 2 or not any(u is silu for u in users) or readers.other_input(silu, gate) != sigmoid.output[0]:
        return None
    product = readers.only(silu.output[0], "Mul")
    if product is None or readers.only(up, "Mul") is not product or readers.other_input(product, up) != silu.output[0]:
        return None
    return [split, sigmoid, silu, product]


def _int8_matmul(inputs, output: str, name: str, per_token: int):
    return helper.make_node("Int8MatMul", list(inputs[:3]), [output], name=f"{name}.int8", domain=EDGEVL_DOMAIN,
                            per_token=per_token)


def fuse_rms_norm(model: onnx.ModelProto, data: Initializers | None = None) -> int:
    """x -> Pow(2) -> ReduceMean(-1) -> Add(eps) -> Sqrt -> Reciprocal -> Mul(x, .) -> Mul(weight, .) becomes
    SimplifiedLayerNormalization(x, weight, epsilon=eps). In place; returns how many were fused."""
    graph, data = model.graph, data or Initializers()
    inits, readers = _initializers(graph), _Readers(graph)
    fused, remove, insert_at = 0, set(), {}
    for pow_node in graph.node:
        if pow_node.op_type != "Pow" or _scalar(inits, pow_node.input[1], data) != 2:
            continue
        x = pow_node.input[0]
        chain = [pow_node]
        for op_type in ("ReduceMean", "Add", "Sqrt", "Reciprocal", "Mul", "Mul"):
            nxt = readers.only(chain[-1].output[0], op_type)
            if nxt is None:
                break
            chain.append(nxt)
        if len(chain) != 7:
            continue
        mean, add, _, _, mul_x, mul_w = chain[1:]
        eps = _scalar(inits, add.input[1], data)
        weight = next((i for i in mul_w.input if i in inits), None)
        if (eps is None or weight is None or x not in mul_x.input or len(mean.input) < 2
                or _scalar(inits, mean.input[1], data) != -1):
            continue
        remove.update(id(n) for n in chain)
        insert_at[id(mul_w)] = helper.make_node(
            "SimplifiedLayerNormalization", [x, weight], [mul_w.output[0]], name=f"{mul_w.name}.rmsnorm",
            axis=-1, epsilon=float(eps))
        fused += 1
    if fused:
        _replace_nodes(graph, [insert_at.get(id(n), n) for n in graph.node
                               if id(n) not in remove or id(n) in insert_at])
        _drop_unused_initializers(graph)
    return fused


def fuse_attention(model: onnx.ModelProto, decoder_spec: dict, max_seq: int, data: Initializers | None = None) -> int:
    """Each layer's attention (the split of the packed QKV projection, RoPE, Concat onto the cache, Q x K^T,
    scale, causal mask, softmax, x V and the head merge) becomes one com.microsoft GroupQueryAttention node
    reading the packed QKV with RoPE inside it: GQA rotates the step's rows at positions it derives from
    seqlens_k (_sequence_lengths), looked up in cos/sin tables of max_seq rows (_rotary_tables; LongRoPE's chosen
    per step). The KV contract is unchanged: past [1, kv, P, d] in, present [1, kv, P + S, d] out. The softmax
    scale moves into the query columns of the QKV projection where it can (_fold_query_scale): ONNX Runtime's CPU
    kernel passes the scale as Q x K^T's GEMM alpha, and MLAS takes its one-row kernel only for alpha 1 (without it
    the 24 layers' decode attention at 700 tokens costs ~0.5 ms more per step on the 2-core Xeon). In place;
    returns how many layers were fused (0 where the graph is not the exported shape)."""
    graph, data = model.graph, data or Initializers()
    inits, consumers = _initializers(graph), _consumers(graph)
    long_rope = decoder_spec.get("long_rope")
    if ROPE_INV_FREQ not in inits or (long_rope and ROPE_INV_FREQ_LONG not in inits):
        return 0
    producer = _Producers(graph)
    fused, remove, replace = 0, set(), {}
    for output in graph.output:
        if not (output.name.startswith("present.") and output.name.endswith(".key")):
            continue
        layer = output.name[len("present."):-len(".key")]
        core = _attention_core(layer, producer, consumers, inits, data)
        if core is None:
            continue
        packed, concat_k, concat_v, merged, scale = core
        query_width = decoder_spec["num_heads"] * (decoder_spec["hidden_size"] // decoder_spec["num_heads"])
        if _fold_query_scale(packed, query_width, scale, producer, consumers, inits, data):
            scale = 1.0
        remove.update((id(concat_k), id(concat_v)))
        replace[id(merged)] = helper.make_node(
            "GroupQueryAttention", [packed, "", "", concat_k.input[0], concat_v.input[0], "gqa.seqlens_k",
                                    "gqa.total_length", "gqa.cos", "gqa.sin"],
            [merged.output[0], concat_k.output[0], concat_v.output[0]], name=f"gqa.{layer}", domain="com.microsoft",
            num_heads=decoder_spec["num_heads"], kv_num_heads=decoder_spec["num_kv_heads"], scale=float(scale),
            do_rotary=1, rotary_interleaved=0)
        fused += 1
    if not fused:
        return 0
    nodes = (_sequence_lengths(graph) + _rotary_tables(graph, inits, long_rope, max_seq, data)
             + [replace.get(id(n), n) for n in graph.node if id(n) not in remove])
    _replace_nodes(graph, nodes)
    _drop_dead_nodes(graph)
    _drop_unused_initializers(graph)
    _use_domain(model)
    return fused


def _attention_core(layer: str, producer: dict, consumers: dict, inits: dict, data: Initializers):
    """(packed QKV, Concat K, Concat V, last node of the head merge, softmax scale) of one exported layer, or
    None where the graph does not have the exported shape (modeling.DecoderLayer.forward)."""
    concat_k, concat_v = producer.get(f"present.{layer}.key"), producer.get(f"present.{layer}.value")
    if concat_k is None or concat_v is None or {concat_k.op_type, concat_v.op_type} != {"Concat"}:
        return None
    # V is the third output of the packed projection's Split, reshaped to heads and transposed.
    v_heads = producer.get(concat_v.input[1])
    v_view = producer.get(v_heads.input[0]) if v_heads is not None and v_heads.op_type == "Transpose" else None
    split = producer.get(v_view.input[0]) if v_view is not None and v_view.op_type == "Reshape" else None
    if split is None or split.op_type != "Split" or len(split.output) != 3 or split.output[2] != v_view.input[0]:
        return None
    scores = [u for t in consumers.get(concat_k.output[0], []) if t.op_type == "Transpose"
              for u in consumers.get(t.output[0], []) if u.op_type == "MatMul"]
    weighted = [u for u in consumers.get(concat_v.output[0], []) if u.op_type == "MatMul"]
    if len(scores) != 1 or len(weighted) != 1:
        return None
    scale_mul = consumers[scores[0].output[0]][0]
    scale = _scalar(inits, scale_mul.input[1], data) if scale_mul.op_type == "Mul" else None
    merged = weighted[0]
    while len(consumers.get(merged.output[0], [])) == 1 and consumers[merged.output[0]][0].op_type in (
            "Reshape", "Transpose"):
        merged = consumers[merged.output[0]][0]
    if scale is None or merged is weighted[0]:
        return None
    return split.input[0], concat_k, concat_v, merged, scale


def _fold_query_scale(packed: str, query_width: int, scale: float, producer: dict, consumers: dict,
                      inits: dict, data: Initializers) -> bool:
    """Multiply the first query_width columns of the projection producing `packed` (MatMul with a constant
    weight, then optionally Add of a constant bias) by scale, so attention can use scale 1 (RoPE is linear, so
    scaling before it is the same). False, and nothing changed, where the graph has another shape or the
    constants are shared."""
    node, bias = producer.get(packed), None
    if node is not None and node.op_type == "Add":
        bias = next((i for i in node.input if i in inits), None)
        rest = [i for i in node.input if i != bias]
        node = producer.get(rest[0]) if bias is not None and len(rest) == 1 else None
    if node is None or node.op_type != "MatMul" or node.input[1] not in inits:
        return False
    constants = [node.input[1]] + ([bias] if bias else [])
    if any(len(consumers.get(name, [])) != 1 for name in constants):
        return False
    for name in constants:
        array = data.array(inits[name]).copy()
        array[..., :query_width] *= np.asarray(scale, array.dtype)
        data.replace(inits[name], array)
    return True


def _sequence_lengths(graph) -> list:
    """GQA's int32 total length (past + new) and seqlens_k = total - 1, from the last position id (positions are
    always past + 0..S-1): not from the past's shape, which is the buffer's capacity when past and present share
    one buffer."""
    graph.initializer.extend([numpy_helper.from_array(np.array(1, np.int32), "gqa.one"),
                              numpy_helper.from_array(np.array([1], np.int64), "gqa.one_dim")])
    return [
        helper.make_node("ReduceMax", ["position_ids"], ["gqa.last_position"], keepdims=0, name="gqa.last_position"),
        helper.make_node("Cast", ["gqa.last_position"], ["gqa.last32"], to=onnx.TensorProto.INT32, name="gqa.last32"),
        helper.make_node("Add", ["gqa.last32", "gqa.one"], ["gqa.total_length"], name="gqa.total_length"),
        helper.make_node("Reshape", ["gqa.last32", "gqa.one_dim"], ["gqa.seqlens_k"], name="gqa.seqlens_k"),
    ]


def _rotary_tables(graph, inits: dict, long_rope: dict | None, max_seq: int, data: Initializers) -> list:
    """GQA's cos/sin caches `gqa.cos` / `gqa.sin` [max_seq, head_dim / 2] (row = position), from the exported
    graph's own RoPE frequencies, so the tables are the model's whatever its RoPE variant. Plain RoPE: two
    initializers, no nodes. LongRoPE (modeling.Rope): a short and a long pair, both scaled by attention_factor, and
    the nodes that pick one pair per run, shared by every layer: long when the run's last position + 1 (its
    total_length) passes original_max_position_embeddings. Like the reference, the choice applies to the run's own
    rows only; cached keys keep the rotation they were written with. The two Where nodes copy a table each per run:
    ~0.15 ms apiece at InternVL2-4B's 4096 x 48 (ONNX Runtime 1.32, 2 threads of a 2-core AMD EPYC VM), where the
    concat layout they replace copies the whole cache every step."""
    def add_tables(inv_freq: str, suffix: str, factor: float) -> None:
        angles = np.arange(max_seq, dtype=np.float64)[:, None] * data.array(inits[inv_freq])
        data.new(graph, (np.cos(angles) * factor).astype(np.float32), f"gqa.cos{suffix}")
        data.new(graph, (np.sin(angles) * factor).astype(np.float32), f"gqa.sin{suffix}")

    if not long_rope:
        add_tables(ROPE_INV_FREQ, "", 1.0)
        return []
    add_tables(ROPE_INV_FREQ, ".short", long_rope["attention_factor"])
    add_tables(ROPE_INV_FREQ_LONG, ".long", long_rope["attention_factor"])
    graph.initializer.append(numpy_helper.from_array(
        np.array(long_rope["original_max_position_embeddings"], np.int32), "gqa.original_max"))
    return [helper.make_node("Greater", ["gqa.total_length", "gqa.original_max"], ["gqa.long"], name="gqa.long")] + [
        helper.make_node("Where", ["gqa.long", f"gqa.{t}.long", f"gqa.{t}.short"], [f"gqa.{t}"], name=f"gqa.{t}")
        for t in ("cos", "sin")]


def fuse_vision_attention(model: onnx.ModelProto, data: Initializers | None = None) -> int:
    """Each InternViT attention as the torch exporter writes F.scaled_dot_product_attention (modeling.VisionLayer:
    the packed QKV reshaped to [B, S, 3, heads, head_dim] and permuted, Q and K^T each scaled, Q x K^T, Softmax,
    x V, heads merged) becomes Split(QKV) into Q, K, V [B, S, C] and one com.microsoft MultiHeadAttention with the
    product of the two scales. ONNX Runtime's CPU kernel computes it head by head with no transposed copies
    (benchmarks/RESULTS.md, "The int8 vision graph on ONNX Runtime's fused ops"). In place; returns how many layers
    were fused."""
    graph, data = model.graph, data or Initializers()
    inits = _initializers(graph)
    producer, readers = _Producers(graph), _Readers(graph)
    def scaled(name):
        """(x, s) where `name` is Mul(x, scalar s), else (None, None)."""
        mul = producer.made_by(name, "Mul")
        scale = mul and next((_scalar(inits, i, data) for i in mul.input if i in inits), None)
        return (None, None) if scale is None else (next(i for i in mul.input if i not in inits), scale)

    replace, fused = {}, 0
    for softmax in graph.node:
        if softmax.op_type != "Softmax" or _attribute(softmax, "axis", -1) not in (-1, 3):
            continue
        scores, weighted = producer.made_by(softmax.input[0], "MatMul"), readers.only(softmax.output[0], "MatMul")
        if scores is None or weighted is None or weighted.input[0] != softmax.output[0]:
            continue
        (q, q_scale), (k_t, k_scale) = scaled(scores.input[0]), scaled(scores.input[1])
        # K^T: K [B, h, S, d] viewed as [B * h, S, d], its last two axes swapped, viewed back as [B, h, d, S].
        view_back = producer.made_by(k_t, "Reshape")
        swap = view_back and producer.made_by(view_back.input[0], "Transpose")
        view = swap and _attribute(swap, "perm") == [0, 2, 1] and producer.made_by(swap.input[0], "Reshape")
        picks = [producer.made_by(name, "Gather") for name in (q, view and view.input[0], weighted.input[1])]
        if q_scale is None or k_scale is None or not all(picks) or len({p.input[0] for p in picks}) != 1 \
                or [_scalar(inits, p.input[1], data) for p in picks] != [0, 1, 2] \
                or any(_attribute(p, "axis", 0) != 0 for p in picks):
            continue
        permute = producer.made_by(picks[0].input[0], "Transpose")
        heads_view = (permute and _attribute(permute, "perm") == [2, 0, 3, 1, 4]
                      and producer.made_by(permute.input[0], "Reshape"))
        shape = heads_view and heads_view.input[1] in inits and data.array(inits[heads_view.input[1]]).tolist()
        merge = readers.only(weighted.output[0], "Transpose")
        merged = merge and _attribute(merge, "perm") == [0, 2, 1, 3] and readers.only(merge.output[0], "Reshape")
        if not shape or len(shape) != 5 or shape[2] != 3 or min(shape[3:]) < 1 or not merged:
            continue
        heads, widths = shape[3], f"mha.widths.{shape[3] * shape[4]}"
        qkv, name = heads_view.input[0], f"mha.{fused}"
        if widths not in inits:
            inits[widths] = numpy_helper.from_array(np.array([shape[3] * shape[4]] * 3, np.int64), widths)
            graph.initializer.append(inits[widths])
        replace[id(merged)] = [
            helper.make_node("Split", [qkv, widths], [f"{name}.q", f"{name}.k", f"{name}.v"], axis=-1,
                             name=f"{name}.split"),
            helper.make_node("MultiHeadAttention", [f"{name}.q", f"{name}.k", f"{name}.v"], [merged.output[0]],
                             name=name, domain="com.microsoft", num_heads=heads, scale=float(q_scale * k_scale))]
        fused += 1
    if fused:
        _replace_nodes(graph, [new for n in graph.node for new in replace.get(id(n), [n])])
        _drop_dead_nodes(graph)
        _drop_unused_initializers(graph)
        _use_domain(model)
    return fused


def drop_matmul_output_requantization(model: onnx.ModelProto, quantized_ops) -> int:
    """Remove each QuantizeLinear -> DequantizeLinear pair on a MatMul's output whose readers are none of
    quantized_ops (static Q/DQ quantizes a weight MatMul's output too, though the bias Add after it reads float):
    the output stays fp32, one int8 rounding fewer, and ONNX Runtime runs the DequantizeLinear -> MatMul as one
    MatMulIntegerToFloat instead of a QLinearMatMul and a DequantizeLinear. In place; returns how many pairs."""
    graph = model.graph
    producer, readers = _Producers(graph), _Readers(graph)
    alias, remove = {}, set()
    for quantize in graph.node:
        source = producer.made_by(quantize.input[0], "MatMul") if quantize.op_type == "QuantizeLinear" else None
        dequantize = source is not None and readers.only(quantize.output[0], "DequantizeLinear")
        if not dequantize or not readers.all(dequantize.output[0]) \
                or any(r.op_type in quantized_ops for r in readers.all(dequantize.output[0])):
            continue
        alias[dequantize.output[0]] = quantize.input[0]
        remove.update((id(quantize), id(dequantize)))
    for node in graph.node:
        node.input[:] = [alias.get(name, name) for name in node.input]
    _replace_nodes(graph, [n for n in graph.node if id(n) not in remove])
    _drop_unused_initializers(graph)
    return len(alias)


def fuse_gelu(model: onnx.ModelProto, data: Initializers | None = None) -> int:
    """The exact GELU as exported (x / sqrt(2) -> Erf -> + 1 -> * 0.5 -> * x) as one com.microsoft Gelu node, which
    ONNX Runtime's own fusion misses in this operand order: one pass over the MLP's widest tensor instead of five.
    In place; returns how many were fused."""
    graph, data = model.graph, data or Initializers()
    inits, producer, readers = _initializers(graph), _Producers(graph), _Readers(graph)

    def constant_of(node, expected: float) -> bool:
        value = next((_scalar(inits, i, data) for i in node.input if i in inits), None)
        return value is not None and abs(value - expected) <= 1e-6 * expected

    replace, remove = {}, set()
    for erf in graph.node:
        divide = producer.made_by(erf.input[0], "Div") if erf.op_type == "Erf" else None
        if divide is None or divide.input[1] not in inits \
                or not constant_of(divide, 2 ** 0.5):
            continue
        x = divide.input[0]
        plus_one = readers.only(erf.output[0], "Add")
        half = plus_one and constant_of(plus_one, 1.0) and readers.only(plus_one.output[0], "Mul")
        product = half and constant_of(half, 0.5) and readers.only(half.output[0], "Mul")
        if not product or readers.other_input(product, half.output[0]) != x or len(readers.all(divide.output[0])) != 1:
            continue
        remove.update(id(n) for n in (divide, erf, plus_one, half))
        replace[id(product)] = helper.make_node("Gelu", [x], [product.output[0]], name=f"{product.name}.gelu",
                                                domain="com.microsoft")
    if replace:
        _replace_nodes(graph, [replace.get(id(n), n) for n in graph.node if id(n) not in remove])
        _drop_unused_initializers(graph)
        _use_domain(model)
    return len(replace)


def _attribute(node, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            value = helper.get_attribute_value(attribute)
            return list(value) if attribute.type == onnx.AttributeProto.INTS else value
    return default


def _one_row_outputs(graph) -> set[str]:
    """Graph outputs whose static shape is one row: [1, ..., 1, N]."""
    rows = set()
    for output in graph.output:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in output.type.tensor_type.shape.dim]
        if len(dims) >= 2 and all(d == 1 for d in dims[:-1]):
            rows.add(output.name)
    return rows


def _drop_dead_nodes(graph) -> None:
    """Remove nodes none of whose outputs reach a graph output (the replaced attention, RoPE and mask)."""
    live = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(out in live for out in node.output):
            keep.append(node)
            live.update(node.input)
    _replace_nodes(graph, reversed(keep))


def _replace_nodes(graph, nodes) -> None:
    del graph.node[:]
    graph.node.extend(nodes)


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _use_domain(model, domain: str = "com.microsoft") -> None:
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, 1))
