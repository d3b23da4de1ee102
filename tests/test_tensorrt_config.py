"""`edgevl build` logic that needs no GPU: profiles, precisions, the ONNX precision rewrite (checked against
ONNX Runtime CPU), manifest section and plan compatibility, and plain errors on machines without a GPU."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgevl import EdgeVL
from edgevl.backends.tensorrt_backend import (PlanMismatchError, check_plan_compatibility, profile_for,
                                              tensorrt_unavailable_reason)
from edgevl.cli import main
from edgevl.export import export_model
from edgevl.export.trt import build_engines
from edgevl.export.trt.builder import BuildError, check_profiles_cover_inputs
from edgevl.export.trt.config import (PRECISIONS, check_limits, decoder_profiles, source_graphs, tensorrt_section,
                                      tile_ranges, vision_profiles)
from edgevl.export.trt.precision import fp32_node_names, write_precision_graph
from edgevl.export.trt_ops import trt_incompatibilities
from edgevl.manifest import read_manifest, write_manifest

NO_TRT = tensorrt_unavailable_reason()
MAX_SEQ = 256
FP16_COSINE = 0.999  # the gate for fp16 engines vs fp32
WEIGHT_INT8_COSINE = 0.99  # tiny random model (hidden 64): quantization noise is relatively large


@pytest.fixture(scope="module")
def export_dir(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt-export")
    export_model(tiny_checkpoint("qwen2"), out, max_seq=MAX_SEQ, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def manifest(export_dir):
    return read_manifest(export_dir)


def cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _decoder_dims(manifest):
    d = manifest["spec"]["decoder"]
    return d["hidden_size"], d["num_layers"], d["num_kv_heads"], d["hidden_size"] // d["num_heads"]


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
    profiles = [p.to_dict() for p in decoder_profiles(MAX_SEQ, *_decoder_dims(manifest))]
    profiles = json.loads(json.dumps(profiles))  # as read back from manifest.json

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
    vision = [p.to_dict() for p in vision_profiles(13)]
    assert [profile_for(vision, {"pixel_values": (t, 3, 448, 448)}) for t in (1, 2, 7, 8, 13)] == [0, 1, 1, 2, 2]


# -- what is built from what ------------------------------------------------------------------------------------

def test_source_graphs_and_limits(manifest):
    assert source_graphs(manifest, "fp16") == {"vision": ("vision.onnx", False), "decoder": ("decoder.onnx", False)}
    assert source_graphs(manifest, "int8")["vision"] == ("vision.onnx", True)  # calibrated during the build
    int8_export = {**manifest, "precision": {"vision": "int8", "decoder": "int8"}}
    with pytest.raises(ValueError, match="MatMulNBits"):
        source_graphs(int8_export, "fp16")
    with pytest.raises(ValueError, match="expected one of"):
        source_graphs(manifest, "int4")
    assert check_limits(manifest, None, None) == (manifest["limits"]["max_tiles"], MAX_SEQ)
    assert check_limits(manifest, 7, 128) == (7, 128)
    with pytest.raises(ValueError, match="re-export with a larger --max-seq"):
        check_limits(manifest, None, MAX_SEQ + 1)
    with pytest.raises(ValueError, match="--max-tiles"):
        check_limits(manifest, 99, None)
    assert set(PRECISIONS) == {"fp16", "int8", "int8-vision-fp16-llm"}


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


def _decode_run(path, embeds, steps, kv_dtype, hidden_dims):
    """Greedy argmax tokens and the logits of a prefill + `steps` decode calls through ONNX Runtime."""
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
        x = table[tokens[-1] % 512][None]
    return tokens, logits_seen


@pytest.mark.parametrize("precision, min_cosine", [("fp16", FP16_COSINE), ("int8-weight-only", WEIGHT_INT8_COSINE)])
def test_decoder_graph_matches_fp32_through_prefill_and_decode(export_dir, manifest, tmp_path, precision,
                                                               min_cosine):
    out = tmp_path / f"decoder-{precision}.onnx"
    quantized = write_precision_graph(export_dir / "decoder.onnx", out, "decoder", precision)
    model = onnx.load(str(out))
    assert trt_incompatibilities(model) == []
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    if precision == "fp16":
        assert quantized == 0 and not dq
    else:
        assert quantized == len(dq) > 0
        assert all(n.attribute[0].i == 1 for n in dq)  # per output channel of a [K, N] weight
    types = _types(model)
    assert types["inputs_embeds"] == onnx.TensorProto.FLOAT
    assert types["past_key_values.0.key"] == types["present.0.key"] == onnx.TensorProto.FLOAT16
    dims = _decoder_dims(manifest)
    embeds = np.random.default_rng(1).standard_normal((40, dims[0])).astype(np.float32)
    ref_tokens, ref_logits = _decode_run(export_dir / "decoder.onnx", embeds, 8, np.float32, dims)
    tokens, logits = _decode_run(out, embeds, 8, np.float16, dims)
    cosines = [cosine(a, b) for a, b in zip(ref_logits, logits)]
    assert min(cosines) >= min_cosine, cosines
    if precision == "fp16":
        assert tokens == ref_tokens


# -- manifest section and plan compatibility --------------------------------------------------------------------

ORIN = {"name": "Orin", "compute_capability": "8.7", "integrated": True}


def _section(manifest):
    profiles = {"vision": vision_profiles(13), "decoder": decoder_profiles(MAX_SEQ, *_decoder_dims(manifest))}
    return tensorrt_section("10.3.0", ORIN, "int8-vision-fp16-llm", 13, MAX_SEQ, profiles,
                            {"vision": 12.345, "decoder": 67.8})


def test_tensorrt_section_records_version_gpu_precisions(manifest):
    section = json.loads(json.dumps(_section(manifest)))
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
    claimed.pop("files")
    claimed["tensorrt"] = _section(claimed)
    write_manifest(fake, claimed)
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
