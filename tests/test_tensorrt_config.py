"""`edgevl build` logic that needs no GPU: profiles, precisions, the ONNX precision rewrite (checked against
ONNX Runtime CPU), manifest section and plan compatibility, and plain errors on machines without a GPU."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgevl import EdgeVL
from edgevl.backends.tensorrt_backend import (PlanMismatchError, TensorRTBackend,
                                              check_plan_compatibility, profile_for, tensorrt_unavailable_reason)
from edgevl.cli import main
from edgevl.device import CudaGraph
from edgevl.export import export_model
from edgevl.export.trt import build_engines
from edgevl.export.trt.builder import BuildError, check_profiles_cover_inputs
from edgevl.export.trt.config import (check_limits, check_tensorrt_supports, decoder_profiles,
                                      source_graphs, tensorrt_section, tile_ranges, vision_profiles)
from edgevl.export.trt.precision import fp32_node_names, int4_block_size, write_precision_graph
from edgevl.export.trt_ops import trt_incompatibilities
from edgevl.manifest import Precision, read_manifest, write_manifest
from edgevl.precisions import BUILD_PRECISIONS

NO_TRT = tensorrt_unavailable_reason()
MAX_SEQ = 384  # > 300 prompt + 32 decode positions, for the fixed-cache parity runs
FP16_COSINE = 0.999  # fp16 engines' image-embedding floor against fp32 (edgevl.precisions, build fp16)
WEIGHT_INT8_COSINE = 0.99  # tiny random model (hidden 64): quantization noise is relatively large
WEIGHT_INT4_COSINE = 0.95  # int4 blocks of 32-64 on the same model: measured min 0.978 over 9 steps


@pytest.fixture(scope="module")
def export_dir(tiny_checkpoint, tmp_path_factory):
    """A qwen2 export with its weights in external data files, as a real model's are (> 1 GB), so the fixed
    cache decoder's sharing of decoder.onnx.data is exercised."""
    from edgevl.export import graphs

    out = tmp_path_factory.mktemp("trt-export")
    threshold, graphs.EXTERNAL_DATA_BYTES = graphs.EXTERNAL_DATA_BYTES, 0
    try:
        export_model(tiny_checkpoint("qwen2"), out, max_seq=MAX_SEQ, log=lambda _: None)
    finally:
        graphs.EXTERNAL_DATA_BYTES = threshold
    return out


@pytest.fixture(scope="module")
def manifest(export_dir):
    return read_manifest(export_dir)


def cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _decoder_dims(manifest):
    d = manifest.spec.decoder
    return d.hidden_size, d.num_layers, d.num_kv_heads, d.head_dim


# -- profiles ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_tiles", [1, 2, 7, 8, 13, 40])
def test_tile_ranges_cover_every_count_once_and_tune_common_counts(max_tiles):
    ranges = tile_ranges(max_tiles)
    covered = [t for lo, _, hi in ranges for t in range(lo, hi + 1)]
    assert covered == list(range(1, max_tiles + 1))
    assert all(lo <= opt <= hi for lo, opt, hi in ranges)
    assert {opt for _, opt, _ in ranges} >= {c for c in (1, 7, 13) if c <= max_tiles}


def test_tile_ranges_for_thirteen_tiles():
    assert tile_ranges(13) == [(1, 1, 1), (2, 7, 7), (8, 13, 13)]
    shapes = vision_profiles(13)[1].shapes["pixel_values"]
    assert shapes == ((2, 3, 448, 448), (7, 3, 448, 448), (7, 3, 448, 448))


def test_decoder_profiles_name_every_decoder_input(export_dir, manifest):
    graph = onnx.load(str(export_dir / "decoder.onnx"), load_external_data=False)
    inputs = [i.name for i in graph.graph.input]
    profiles = decoder_profiles(MAX_SEQ, *_decoder_dims(manifest))
    check_profiles_cover_inputs(profiles, inputs)
    with pytest.raises(BuildError, match="no shapes for inputs"):
        check_profiles_cover_inputs(profiles, inputs + ["attention_mask"])
    prefill, decode = profiles
    assert prefill.shapes["inputs_embeds"] == ((1, 1, 64), (1, MAX_SEQ, 64), (1, MAX_SEQ, 64))
    assert prefill.shapes["past_key_values.0.key"] == ((1, 2, 0, 16),) * 3
    assert decode.shapes["position_ids"] == ((1, 1),) * 3
    assert decode.shapes["past_key_values.1.value"] == ((1, 2, 1, 16), (1, 2, MAX_SEQ // 2, 16),
                                                        (1, 2, MAX_SEQ - 1, 16))


def test_profile_for_routes_prefill_and_decode_and_refuses_overflow(manifest):
    profiles = decoder_profiles(MAX_SEQ, *_decoder_dims(manifest))

    def shapes(seq, past):
        return {"inputs_embeds": (1, seq, 64), "past_key_values.0.key": (1, 2, past, 16)}

    assert profile_for(profiles, shapes(300 if MAX_SEQ >= 300 else MAX_SEQ, 0)) == 0
    assert profile_for(profiles, shapes(1, 0)) == 0  # a one-token prompt is still a prefill
    assert profile_for(profiles, shapes(1, 1)) == 1
    assert profile_for(profiles, shapes(1, MAX_SEQ - 1)) == 1
    with pytest.raises(ValueError, match="no optimization profile"):
        profile_for(profiles, shapes(1, MAX_SEQ))
    with pytest.raises(ValueError, match="no optimization profile"):
        profile_for(profiles, shapes(2, 5))  # chunked continuation is not a call the runtime makes
    vision = vision_profiles(13)
    assert [profile_for(vision, {"pixel_values": (t, 3, 448, 448)}) for t in (1, 2, 7, 8, 13)] == [0, 1, 1, 2, 2]


# -- what is built from what ------------------------------------------------------------------------------------

def test_source_graphs_and_limits(manifest):
    assert source_graphs(manifest, "fp16") == {"vision": ("vision.onnx", False), "decoder": ("decoder.onnx", False)}
    assert source_graphs(manifest, "int8")["vision"] == ("vision.onnx", True)  # calibrated during the build
    int8_export = replace(manifest, precision=Precision("int8", "int8"))
    with pytest.raises(ValueError, match="an ONNX Runtime graph"):
        source_graphs(int8_export, "fp16")
    with pytest.raises(ValueError, match="expected one of"):
        source_graphs(manifest, "int4")
    assert source_graphs(manifest, "int4-llm", "fixed") == {"vision": ("vision.onnx", False),
                                                           "decoder": ("decoder_fixed.onnx", False)}
    without_fixed = replace(manifest, graphs=replace(manifest.graphs, decoder_fixed=None))
    with pytest.raises(ValueError, match="--kv-cache fixed .* re-export"):
        source_graphs(without_fixed, "fp16", "fixed")
    assert check_limits(manifest, None, None) == (manifest.limits.max_tiles, MAX_SEQ)
    assert check_limits(manifest, 7, 128) == (7, 128)
    with pytest.raises(ValueError, match="re-export with a larger --max-seq"):
        check_limits(manifest, None, MAX_SEQ + 1)
    with pytest.raises(ValueError, match="--max-tiles"):
        check_limits(manifest, 99, None)
    assert set(BUILD_PRECISIONS) == {"fp16", "int8", "int8-vision-fp16-llm", "int4-llm", "int8-vision-int4-llm"}
    assert (BUILD_PRECISIONS["int4-llm"].vision, BUILD_PRECISIONS["int4-llm"].decoder) == ("fp16", "int4-weight-only")
    recipe = BUILD_PRECISIONS["int8-vision-int4-llm"]
    assert (recipe.vision, recipe.decoder) == ("int8", "int4-weight-only")


def test_int4_needs_tensorrt_10_and_ampere():
    check_tensorrt_supports("int4-llm", "10.3.0", "8.7")  # JetPack 6 on Orin
    check_tensorrt_supports("int8-vision-int4-llm", "11.0.1", "12.0")
    check_tensorrt_supports("int8", "8.6.1", "7.5")  # nothing new asked of older stacks
    with pytest.raises(ValueError, match=r"need TensorRT >= 10\.0, this is TensorRT 8\.6\.1"):
        check_tensorrt_supports("int4-llm", "8.6.1", "8.7")
    with pytest.raises(ValueError, match=r"compute capability >= 8\.0.*this GPU is 7\.5"):
        check_tensorrt_supports("int8-vision-int4-llm", "10.3.0", "7.5")


# -- the precision rewrite, run by ONNX Runtime CPU -------------------------------------------------------------

def _types(model):
    types = {t.name: t.data_type for t in model.graph.initializer}
    types.update({n.output[0]: n.attribute[0].t.data_type for n in model.graph.node
                  if n.op_type == "Constant" and n.attribute[0].name == "value"})
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        types[value.name] = value.type.tensor_type.elem_type
    return types


def test_fp32_islands_are_norms_softmax_and_residual_adds(export_dir):
    model = onnx.load(str(export_dir / "vision.onnx"))
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"n{i}"
    blocked = set(fp32_node_names(model))
    constants = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert node.name in blocked
        if node.op_type == "Add" and sum(i not in constants for i in node.input) == 2:
            assert node.name in blocked, "residual add left in fp16"
        if node.op_type in ("MatMul", "Conv"):
            assert node.name not in blocked
    bias_adds = [n for n in model.graph.node if n.op_type == "Add" and any(i in constants for i in n.input)]
    assert bias_adds and not any(n.name in blocked for n in bias_adds if not n.input[0].startswith("Reduce"))


def test_fp16_vision_graph_matches_fp32(export_dir, tmp_path):
    out = tmp_path / "vision.trt.onnx"
    write_precision_graph(export_dir / "vision.onnx", out, "vision", "fp16")
    model = onnx.load(str(out))
    assert trt_incompatibilities(model) == []
    inits = {t.data_type for t in model.graph.initializer if len(t.dims) == 2}
    assert onnx.TensorProto.FLOAT16 in inits  # the matmul weights really are fp16
    types = _types(onnx.shape_inference.infer_shapes(model))
    islands = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert islands and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in islands)
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    matmul_types = [types[i] for n in matmuls for i in n.input if i in types]  # inference stops at dynamic Reshapes
    assert len(matmul_types) >= len(matmuls) and set(matmul_types) == {onnx.TensorProto.FLOAT16}
    x = np.random.default_rng(0).standard_normal((3, 3, 448, 448)).astype(np.float32)
    ref = ort.InferenceSession(str(export_dir / "vision.onnx")).run(None, {"pixel_values": x})[0]
    got = ort.InferenceSession(str(out)).run(None, {"pixel_values": x})[0]
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert min(cosine(a, b) for a, b in zip(ref, got)) >= FP16_COSINE
    assert not np.allclose(ref, got, atol=0, rtol=1e-7)  # fp16 arithmetic did happen


def _decode_run(path, embeds, steps, kv_dtype, hidden_dims, follow=None):
    """Greedy argmax tokens and the logits of a prefill + `steps` decode calls through ONNX Runtime; `follow`
    (another run's tokens) feeds those instead of this run's own, so logits stay comparable after a flip."""
    session = ort.InferenceSession(str(path))
    names = [i.name for i in session.get_inputs() if i.name.startswith("past_")]
    _, _, kv, head_dim = hidden_dims
    past = {n: np.zeros((1, kv, 0, head_dim), kv_dtype) for n in names}
    x, pos, logits_seen, tokens = embeds, 0, [], []
    table = np.random.default_rng(7).standard_normal((512, embeds.shape[1])).astype(np.float32)
    for _ in range(steps + 1):
        feeds = {"inputs_embeds": x[None], "position_ids": np.arange(pos, pos + len(x))[None], **past}
        outputs = session.run(None, feeds)
        logits = outputs[0][0, -1].astype(np.float32)
        logits_seen.append(logits)
        past = dict(zip(names, outputs[1:]))
        pos += len(x)
        tokens.append(int(np.argmax(logits)))
        x = table[(follow or tokens)[len(tokens) - 1] % 512][None]
    return tokens, logits_seen


@pytest.mark.parametrize("precision, min_cosine", [("fp16", FP16_COSINE), ("int8-weight-only", WEIGHT_INT8_COSINE),
                                                   ("int4-weight-only", WEIGHT_INT4_COSINE)])
def test_decoder_graph_matches_fp32_through_prefill_and_decode(export_dir, manifest, tmp_path, precision,
                                                               min_cosine):
    out = tmp_path / f"decoder-{precision}.onnx"
    quantized = write_precision_graph(export_dir / "decoder.onnx", out, "decoder", precision)
    model = onnx.load(str(out))
    assert trt_incompatibilities(model) == []
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    if precision == "fp16":
        assert quantized == 0 and not dq
    elif precision == "int8-weight-only":
        assert quantized == len(dq) > 0
        assert all(n.attribute[0].i == 1 for n in dq)  # per output channel of a [K, N] weight
    else:
        assert quantized == len(dq) > 0
        assert all({a.name: a.i for a in n.attribute} == {"axis": 0, "block_size": int4_block_size(
            _init(model, n.input[0]).dims[0])} for n in dq)  # blocks along K of a [K, N] weight
    types = _types(model)
    assert types["inputs_embeds"] == onnx.TensorProto.FLOAT
    assert types["past_key_values.0.key"] == types["present.0.key"] == onnx.TensorProto.FLOAT16
    dims = _decoder_dims(manifest)
    embeds = np.random.default_rng(1).standard_normal((40, dims[0])).astype(np.float32)
    ref_tokens, ref_logits = _decode_run(export_dir / "decoder.onnx", embeds, 8, np.float32, dims)
    tokens, logits = _decode_run(out, embeds, 8, np.float16, dims, follow=ref_tokens)
    cosines = [cosine(a, b) for a, b in zip(ref_logits, logits)]
    print(f"{precision} decoder logits cosine vs fp32: min {min(cosines):.4f}")
    assert min(cosines) >= min_cosine, cosines
    if precision == "fp16":
        assert tokens == ref_tokens


# -- manifest section and plan compatibility --------------------------------------------------------------------

ORIN = {"name": "Orin", "compute_capability": "8.7", "integrated": True}


def _section(manifest):
    profiles = {"vision": vision_profiles(13), "decoder": decoder_profiles(MAX_SEQ, *_decoder_dims(manifest))}
    return tensorrt_section("10.3.0", ORIN, "int8-vision-fp16-llm", 13, MAX_SEQ, profiles,
                            {"vision": 12.345, "decoder": 67.8})


def test_tensorrt_section_records_version_gpu_precisions(export_dir, manifest, tmp_path):
    built = shutil.copytree(export_dir, tmp_path / "built")
    for plan in ("vision.plan", "decoder.plan"):
        (built / plan).write_bytes(b"a plan")
    write_manifest(built, replace(manifest, tensorrt=_section(manifest)))
    assert read_manifest(built).tensorrt == _section(manifest)  # written and read back whole, typed
    section = json.loads((built / "manifest.json").read_text())["tensorrt"]
    assert section["version"] == "10.3.0"
    assert section["gpu"] == {"name": "Orin", "compute_capability": "8.7", "integrated": True}
    assert section["precision"] == {"vision": "int8", "decoder": "fp16"}
    assert section["plans"] == {"vision": "vision.plan", "decoder": "decoder.plan"}
    assert [p["name"] for p in section["profiles"]["decoder"]] == ["prefill", "decode"]
    assert section["build_seconds"] == {"vision": 12.35, "decoder": 67.8}


def test_plan_compatibility(manifest):
    section = _section(manifest)
    assert check_plan_compatibility(section, "10.3.0", ORIN) == []
    with pytest.raises(PlanMismatchError, match=r"TensorRT 10\.3\.0, this is TensorRT 10\.7\.0.*edgevl build /m"):
        check_plan_compatibility(section, "10.7.0", ORIN, "/m")
    thor = {"name": "NVIDIA Thor", "compute_capability": "11.0", "integrated": True}
    with pytest.raises(PlanMismatchError, match=r"compute capability 8\.7.*compute capability 11\.0.*rebuild"):
        check_plan_compatibility(section, "10.3.0", thor)
    warnings = check_plan_compatibility(section, "10.3.0", {**ORIN, "name": "Orin NX"})
    assert len(warnings) == 1 and "same architecture" in warnings[0]


# -- machines without a GPU -------------------------------------------------------------------------------------

@pytest.mark.skipif(NO_TRT is None, reason="this machine has TensorRT and a GPU: the no-GPU errors do not apply")
def test_build_and_backend_say_plainly_that_tensorrt_needs_a_gpu(export_dir, capsys, tmp_path):
    with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):
        build_engines(export_dir, log=lambda _: None)
    assert main(["build", str(export_dir)]) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err
    # An export that claims plans: the default stays onnxruntime here, an explicit tensorrt is refused plainly.
    import shutil

    fake = tmp_path / "with-plans"
    shutil.copytree(export_dir, fake)
    (fake / "vision.plan").write_bytes(b"not a plan")
    (fake / "decoder.plan").write_bytes(b"not a plan")
    claimed = read_manifest(fake)
    write_manifest(fake, replace(claimed, tensorrt=_section(claimed)))
    model = EdgeVL.from_pretrained(fake)
    assert type(model.backend).__name__ == "OnnxRuntimeBackend"
    with pytest.raises(RuntimeError, match="backend='tensorrt' needs an NVIDIA GPU"):
        EdgeVL.from_pretrained(fake, backend="tensorrt")


def test_importing_edgevl_and_the_backend_module_loads_no_tensorrt():
    import subprocess
    import sys

    code = ("import sys, edgevl, edgevl.backends.tensorrt_backend, edgevl.doctor, edgevl.export.trt.config; "
            "print(sorted(m for m in ('tensorrt', 'torch', 'cuda.bindings.runtime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- int4 weight-only decoder -----------------------------------------------------------------------------------

def _init(model, name):
    return next(t for t in model.graph.initializer if t.name == name)


def test_int4_block_size_is_128_where_it_divides_k():
    assert [int4_block_size(k) for k in (896, 2048, 3072, 4864, 8192)] == [128] * 5  # InternVL2-1B/2B/4B
    assert [int4_block_size(k) for k in (64, 96, 48)] == [64, 32, 16]  # tiny models: largest power of two dividing
    assert int4_block_size(24) is None  # no block >= 16: the weight stays fp16


def test_int4_weights_are_packed_int4_and_pass_the_parser_table(export_dir, tmp_path):
    paths = {bits: tmp_path / f"decoder-int{bits}.onnx" for bits in (8, 4)}
    counts = {bits: write_precision_graph(export_dir / "decoder.onnx", path, "decoder", f"int{bits}-weight-only")
              for bits, path in paths.items()}
    assert counts[4] == counts[8] > 0
    model = onnx.load(str(paths[4]))
    assert trt_incompatibilities(model) == []
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 21
    quantized_elements = 0
    for node in (n for n in model.graph.node if n.op_type == "DequantizeLinear"):
        weight, scale, zero = (_init(model, name) for name in node.input)
        k, n = weight.dims
        block = int4_block_size(k)
        assert weight.data_type == zero.data_type == onnx.TensorProto.INT4
        assert len(weight.raw_data) == k * n // 2  # two weights a byte: really 4 bits on disk
        assert scale.data_type == onnx.TensorProto.FLOAT16 and list(scale.dims) == [k // block, n]
        assert list(zero.dims) == list(scale.dims) and not np.any(onnx.numpy_helper.to_array(zero))
        quantized_elements += k * n
    saved = paths[8].stat().st_size - paths[4].stat().st_size
    assert saved >= 0.9 * quantized_elements / 2  # int8 -> int4 halves the quantized weights; scales cost little


def _dq_graph(weight: np.ndarray, scale: np.ndarray, zero: np.ndarray, opset: int = 21, extra_nodes=()):
    from onnx import TensorProto, helper

    from edgevl.export.trt.precision import _int_tensor

    k = weight.shape[0]
    inits = [_int_tensor("w", weight, 4), onnx.numpy_helper.from_array(scale, "s"), _int_tensor("z", zero, 4)]
    nodes = [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"], name="dq", axis=0,
                              block_size=k // scale.shape[0]),
             helper.make_node("MatMul", ["x", "wf"], ["y"], name="mm"), *extra_nodes]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, weight.shape[1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_parser_table_int4_restrictions():
    w = np.zeros((64, 8), np.int8)
    scale = np.ones((2, 8), np.float16)
    assert trt_incompatibilities(_dq_graph(w, scale, np.zeros((2, 8), np.int8))) == []
    assert any("zero point" in p for p in trt_incompatibilities(_dq_graph(w, scale, np.ones((2, 8), np.int8))))
    odd = trt_incompatibilities(_dq_graph(np.zeros((64, 7), np.int8), np.ones((2, 7), np.float16),
                                          np.zeros((2, 7), np.int8)))
    assert any("odd last dimension" in p for p in odd)
    assert any("opset 22" in p for p in trt_incompatibilities(_dq_graph(w, scale, np.zeros((2, 8), np.int8), 22)))
    from onnx import helper

    norm = helper.make_node("GroupNormalization", ["y", "s", "s"], ["g"], name="gn", num_groups=1)
    assert any("GroupNormalization in node gn changed meaning" in p
               for p in trt_incompatibilities(_dq_graph(w, scale, np.zeros((2, 8), np.int8), extra_nodes=[norm])))
    # Opset 21 is accepted only for INT4 weight-only graphs: the parser table documents opsets up to 20.
    from onnx import TensorProto

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    plain = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g", [x],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]),
                              opset_imports=[helper.make_opsetid("", 21)])
    assert any("opset 21 only for INT4" in p for p in trt_incompatibilities(plain))


# -- fixed-capacity KV cache (TensorRT decode step as a CUDA graph) -----------------------------------------

FIXED_CAPACITY = MAX_SEQ  # phi3's LongRoPE switches at 320 on the way to 332 positions


@pytest.fixture(scope="module")
def decoder_pair(tiny_checkpoint, export_dir):
    """family -> (directory with decoder.onnx and decoder_fixed.onnx exported from the same model, its decoder
    spec); qwen2's is the export above (external weights), the others export just the two decoders."""
    from edgevl.backends.torch_backend import TorchBackend
    from edgevl.checkpoint import load_checkpoint
    from edgevl.export import graphs

    made = {"qwen2": (export_dir, read_manifest(export_dir).spec.decoder)}

    def make(family):
        if family not in made:
            out = export_dir.parent / f"fixed-{family}"
            out.mkdir()
            lm = TorchBackend(load_checkpoint(tiny_checkpoint(family)), dtype="float32").lm
            graphs.export_decoder(lm, out / "decoder.onnx", FIXED_CAPACITY)
            graphs.export_decoder_fixed_cache(lm, out / "decoder_fixed.onnx", FIXED_CAPACITY,
                                              weights_from=out / "decoder.onnx")
            made[family] = (out, lm.spec)
        return made[family]

    return make


def kv_names(num_layers):
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def _greedy(session, embeds, steps, past, table):
    names = [i.name for i in session.get_inputs() if i.name.startswith("past_")]
    x, pos, tokens, logits_seen = embeds, 0, [], []
    for _ in range(steps + 1):
        outputs = session.run(None, {"inputs_embeds": x[None], "position_ids": np.arange(pos, pos + len(x))[None],
                                     **past})
        logits_seen.append(outputs[0][0, -1].astype(np.float32))
        past = dict(zip(names, outputs[1:]))
        pos += len(x)
        tokens.append(int(np.argmax(logits_seen[-1])))
        x = table[tokens[-1] % len(table)][None]
    return tokens, logits_seen, past


@pytest.mark.parametrize("family", ["qwen2", "internlm2", "phi3"])
def test_fixed_cache_decoder_matches_concat_decoder(decoder_pair, family):
    out, spec = decoder_pair(family)
    fixed = onnx.load(str(out / "decoder_fixed.onnx"), load_external_data=False)
    assert trt_incompatibilities(fixed) == []
    assert "ScatterElements" in {n.op_type for n in fixed.graph.node}
    rng = np.random.default_rng(3)
    embeds = rng.standard_normal((300, spec.hidden_size)).astype(np.float32)
    table = rng.standard_normal((512, spec.hidden_size)).astype(np.float32)
    names = kv_names(spec.num_layers)
    shape = (1, spec.num_kv_heads, 0, spec.head_dim)
    ref_tokens, ref_logits, ref_past = _greedy(ort.InferenceSession(str(out / "decoder.onnx")), embeds, 32,
                                               {n: np.zeros(shape, np.float32) for n in names}, table)
    capacity = (1, spec.num_kv_heads, FIXED_CAPACITY, spec.head_dim)
    stale = {n: rng.standard_normal(capacity).astype(np.float32) for n in names}  # masked: any finite value works
    tokens, logits, past = _greedy(ort.InferenceSession(str(out / "decoder_fixed.onnx")), embeds, 32, stale, table)
    assert tokens == ref_tokens
    assert max(np.abs(a - b).max() for a, b in zip(ref_logits, logits)) < 1e-4
    used = 300 + 32
    for name in names:  # the cache holds the same rows, written at their positions; later rows untouched
        np.testing.assert_allclose(past[name][:, :, :used], ref_past[name], atol=1e-5)
        np.testing.assert_array_equal(past[name][:, :, used:], stale[name][:, :, used:])



def test_fixed_cache_graph_shares_the_decoders_external_weights(decoder_pair):
    out, _ = decoder_pair("qwen2")
    assert not (out / "decoder_fixed.onnx.data").exists()
    fixed = onnx.load(str(out / "decoder_fixed.onnx"), load_external_data=False)
    external = [t for t in fixed.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    matmul_weights = [t for t in fixed.graph.initializer if len(t.dims) == 2 and min(t.dims) >= 64]
    assert external and {t.name for t in matmul_weights} <= {t.name for t in external}
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {"decoder.onnx.data"}
    assert (out / "decoder_fixed.onnx").stat().st_size < (out / "decoder.onnx.data").stat().st_size


@pytest.mark.parametrize("precision", ["fp16", "int4-weight-only"])
def test_fixed_cache_graph_precision_rewrites(decoder_pair, tmp_path, precision):
    out, spec = decoder_pair("internlm2")
    dst = tmp_path / "decoder_fixed.trt.onnx"
    write_precision_graph(out / "decoder_fixed.onnx", dst, "decoder", precision)
    assert trt_incompatibilities(onnx.load(str(dst))) == []
    if precision != "fp16":
        return
    rng = np.random.default_rng(4)
    embeds = rng.standard_normal((40, spec.hidden_size)).astype(np.float32)
    table = rng.standard_normal((512, spec.hidden_size)).astype(np.float32)
    capacity = (1, spec.num_kv_heads, 64, spec.head_dim)
    ref = _greedy(ort.InferenceSession(str(out / "decoder_fixed.onnx")), embeds, 8,
                  {n: np.zeros(capacity, np.float32) for n in kv_names(spec.num_layers)}, table)
    got = _greedy(ort.InferenceSession(str(dst)), embeds, 8,
                  {n: np.zeros(capacity, np.float16) for n in kv_names(spec.num_layers)}, table)
    assert min(cosine(a, b) for a, b in zip(ref[1], got[1])) >= FP16_COSINE and got[0] == ref[0]


def test_fixed_cache_profiles_and_routing(export_dir, manifest):
    graph = onnx.load(str(export_dir / "decoder_fixed.onnx"), load_external_data=False)
    profiles = decoder_profiles(MAX_SEQ, *_decoder_dims(manifest), kv_cache="fixed")
    check_profiles_cover_inputs(profiles, [i.name for i in graph.graph.input])
    prefill, decode = profiles
    assert prefill.shapes["inputs_embeds"] == ((1, 2, 64), (1, MAX_SEQ, 64), (1, MAX_SEQ, 64))
    assert prefill.shapes["past_key_values.0.key"] == decode.shapes["past_key_values.0.key"] == (
        (1, 2, MAX_SEQ, 16),) * 3  # static: the capacity is the plan's max_seq
    assert decode.shapes["position_ids"] == ((1, 1),) * 3
    def shapes(seq, capacity=MAX_SEQ):
        return {"inputs_embeds": (1, seq, 64), "past_key_values.0.key": (1, 2, capacity, 16)}

    assert [profile_for(profiles, shapes(s)) for s in (1, 2, 300 if MAX_SEQ >= 300 else MAX_SEQ)] == [1, 0, 0]
    with pytest.raises(ValueError, match="no optimization profile"):
        profile_for(profiles, shapes(1, MAX_SEQ // 2))
    with pytest.raises(ValueError, match="kv_cache='paged'"):
        decoder_profiles(MAX_SEQ, *_decoder_dims(manifest), kv_cache="paged")


def test_export_manifest_records_the_fixed_cache_graph(export_dir, manifest):
    assert manifest.graphs.decoder_fixed == "decoder_fixed.onnx"
    assert "decoder_fixed.onnx" in manifest.files
    fixed = manifest.kv_cache.decoder_fixed
    assert fixed.layout == "fixed" and "capacity" in fixed.inputs and "position_ids" in fixed.outputs
    assert manifest.kv_cache.layout == "concat"  # what ONNX Runtime runs is unchanged
    section = tensorrt_section("10.3.0", ORIN, "fp16", 13, MAX_SEQ, {}, {}, kv_cache="fixed")
    assert section.kv_cache.layout == "fixed-ping-pong" and section.kv_cache.cuda_graph
    assert tensorrt_section("10.3.0", ORIN, "fp16", 13, MAX_SEQ, {}, {}).kv_cache.layout == "concat-ping-pong"


def test_cuda_graph_is_refused_where_it_cannot_apply(export_dir, manifest):
    concat = replace(manifest, tensorrt=tensorrt_section("10.3.0", ORIN, "fp16", 13, MAX_SEQ, {}, {}))
    with pytest.raises(ValueError, match="--kv-cache fixed"):
        TensorRTBackend(export_dir, concat, cuda_graph=True)
    with pytest.raises(ValueError, match="TensorRT backend option"):
        EdgeVL.from_pretrained(export_dir, backend="onnxruntime", cuda_graph=True)


class _FakeCudart:
    """cuda-python's runtime surface CudaGraph uses, recording calls; `capture_error` fails EndCapture."""

    class cudaError_t:  # noqa: N801 (cuda-python's names)
        class _Err(int):  # cuda-python's status enums are ints, 0 for success
            def __new__(cls, value, name):
                err = int.__new__(cls, value)
                err.name = name
                return err

        cudaSuccess = _Err(0, "cudaSuccess")
        cudaErrorStreamCaptureInvalidated = _Err(901, "cudaErrorStreamCaptureInvalidated")

    class cudaStreamCaptureMode:  # noqa: N801
        cudaStreamCaptureModeThreadLocal = "thread-local"

    def __init__(self, capture_error=None):
        self.calls, self.capture_error = [], capture_error

    def __getattr__(self, name):
        def call(*args):
            self.calls.append(name)
            if name == "cudaStreamEndCapture":
                return (self.capture_error or self.cudaError_t.cudaSuccess, "graph")
            return (self.cudaError_t.cudaSuccess, "exec") if name == "cudaGraphInstantiate" else (
                self.cudaError_t.cudaSuccess,)
        return call


def test_cuda_graph_capture_ends_the_capture_and_raises_on_failure():
    ok = _FakeCudart()
    graph = CudaGraph(ok, "stream", lambda: ok.calls.append("enqueue") or True, "step")
    graph.launch()
    assert ok.calls == ["cudaStreamBeginCapture", "enqueue", "cudaStreamEndCapture", "cudaGraphInstantiate",
                        "cudaGraphLaunch"]
    for cudart, enqueue, reason in [
            (_FakeCudart(_FakeCudart.cudaError_t.cudaErrorStreamCaptureInvalidated), lambda: True,
             "cudaStreamEndCapture returned cudaErrorStreamCaptureInvalidated"),
            (_FakeCudart(), lambda: False, "execute_async_v3 returned False")]:
        with pytest.raises(RuntimeError, match=f"capturing step as a CUDA graph failed: {reason}"):
            CudaGraph(cudart, "stream", enqueue, "step")
        assert cudart.calls == ["cudaStreamBeginCapture", "cudaStreamEndCapture", "cudaGraphDestroy"]
