"""ONNX export + ONNX Runtime backend: parity with the PyTorch reference, quantization drift, the manifest
contract, TensorRT-parser compatibility of the graphs, and a torch-free runtime."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import onnx
import pytest

from edgevl import EdgeVL, cpu
from edgevl.backends.onnxruntime_backend import OnnxRuntimeBackend
from edgevl.cli import main
from edgevl.drift import cosine
from edgevl.export.trt_ops import trt_incompatibilities
from edgevl.manifest import ExportError, read_manifest
from edgevl.precisions import EXPORT_PRECISIONS
from edgevl.preprocess import preprocess_image
from edgevl.synthetic import synthetic_image

FAMILIES = ["qwen2", "internlm2", "phi3"]
EMBED_ATOL = 1e-4  # fp32 ONNX Runtime vs fp32 PyTorch: measured max diffs ~1e-6
LOGITS_ATOL = 1e-3


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tiny_checkpoint, exported):
    family = request.param
    return EdgeVL.from_pretrained(tiny_checkpoint(family)), EdgeVL.from_pretrained(exported(family))


@pytest.mark.parametrize("tiles", [1, 2, 13])
def test_image_embeddings_match_torch(pair, tiles):
    torch_model, ort_model = pair
    pixel_values = np.concatenate([preprocess_image(synthetic_image(1400, 1000, seed=3), torch_model.spec.tiling)])
    pixel_values = pixel_values[:tiles]
    assert len(pixel_values) == tiles
    np.testing.assert_allclose(ort_model.backend.encode_images(pixel_values),
                               torch_model.backend.encode_images(pixel_values), atol=EMBED_ATOL, rtol=0)


@pytest.mark.parametrize("chunk", [None, 7], ids=["one-run", "chunks-of-7"])
def test_logits_match_torch_through_prefill_and_decode(pair, chunk):
    torch_model, ort_model = pair
    ids = np.array(torch_model.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 8))[:60]
    assert len(ids) == 60  # 8 chunks of 7 and a partial one
    embeds = torch_model.backend.embed_tokens(ids)
    np.testing.assert_array_equal(ort_model.backend.embed_tokens(ids), embeds)
    ort_model.backend.prefill_chunk, default = chunk, ort_model.backend.prefill_chunk
    try:
        a, b = torch_model.backend.prefill(embeds), ort_model.backend.prefill(embeds)
        for _ in range(8):
            np.testing.assert_allclose(b, a, atol=LOGITS_ATOL, rtol=0)
            token = int(np.argmax(a))
            a, b = torch_model.backend.decode(token), ort_model.backend.decode(token)
    finally:
        ort_model.backend.prefill_chunk = default


@pytest.mark.parametrize("family, precision, length", [("qwen2", "fp32", 37), ("qwen2", "int8", 37),
                                                       ("qwen2", "int4", 37), ("phi3", "fp32", 330),
                                                       ("phi3", "int8", 330)])
def test_chunked_prefill_equals_one_run(exported, family, precision, length):
    """CPU prefill runs in chunks that extend the cache (concat layout for fp32, GQA's shared buffer for int8/int4):
    the logits of the prompt's last position and of the decode steps after it must not depend on the chunking.
    Phi-3's prompt crosses its LongRoPE switch (320), which makes it one run."""
    backend = EdgeVL.from_pretrained(exported(family, precision)).backend
    assert backend.prefill_chunk == 256
    embeds = backend.embed_tokens(np.arange(3, 3 + length))

    def run(chunk):
        backend.prefill_chunk = chunk
        logits = [backend.prefill(embeds)]
        for _ in range(3):
            logits.append(backend.decode(int(np.argmax(logits[-1]))))
        return np.stack(logits)

    np.testing.assert_allclose(run(5), run(None), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"prefill of 0 positions: expected 1\.\."):
        backend.prefill(embeds[:0])


def test_decoder_session_leaves_the_environment_as_it_was(exported, monkeypatch):
    """The plain-GQA switch is set only while the decoder session is built; a value the user set is kept."""
    monkeypatch.delenv("ORT_GQA_DISABLE_FLASH_ATTENTION", raising=False)
    EdgeVL.from_pretrained(exported("qwen2", "int8"))
    assert "ORT_GQA_DISABLE_FLASH_ATTENTION" not in os.environ
    monkeypatch.setenv("ORT_GQA_DISABLE_FLASH_ATTENTION", "0")
    EdgeVL.from_pretrained(exported("qwen2", "int8"))
    assert os.environ["ORT_GQA_DISABLE_FLASH_ATTENTION"] == "0"


@pytest.mark.parametrize("sizes, tiles", [([(448, 448)], [1]), ([(900, 450)], [3]), ([(1400, 1000)], [13]),
                                          ([(448, 448), (900, 450)], [1, 3])],
                         ids=["1-tile", "3-tiles", "13-tiles", "two-images"])
def test_greedy_tokens_match_torch(pair, sizes, tiles):
    torch_model, ort_model = pair
    images = [synthetic_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    a = torch_model.generate("What is in the picture?", images, max_new_tokens=32)
    b = ort_model.generate("What is in the picture?", images, max_new_tokens=32)
    assert a.tiles_per_image == b.tiles_per_image == tiles
    assert len(a.token_ids) >= 16, "the random model stopped too early for the check to mean anything"
    assert b.token_ids == a.token_ids and b.text == a.text


@pytest.mark.parametrize("family", FAMILIES)
def test_graphs_use_only_tensorrt_operators(exported, family):
    for graph in ("vision.onnx", "decoder.onnx"):
        model = onnx.load(exported(family) / graph)
        assert trt_incompatibilities(model) == [], graph
    manifest = json.loads((exported(family) / "manifest.json").read_text())
    assert manifest["limits"] == {"max_tiles": 13, "max_seq": 4096}
    assert manifest["kv_cache"]["layout"] == "concat"
    assert manifest["tokens"]["img_context"] == EdgeVL.from_pretrained(exported(family)).tokenizer.token_to_id(
        "<IMG_CONTEXT>")


def test_calibrated_vision_qdq_is_tensorrt_explicit_quantization(exported, tmp_path):
    """The vision graph `edgevl build` calibrates for a TensorRT int8 engine (export/trt, _calibrate_vision)."""
    from edgevl.export.quantize import calibration_tiles, quantize_vision_int8
    from edgevl.manifest import read_manifest

    source = exported("qwen2")
    tiling = read_manifest(source, verify_checksums=False).spec.tiling
    quantize_vision_int8(source / "vision.onnx", tmp_path / "vision.onnx", calibration_tiles(None, tiling, 2),
                         log=lambda _: None)
    model = onnx.load(tmp_path / "vision.onnx")
    assert trt_incompatibilities(model) == []
    _assert_symmetric_qdq_with_fp32_attention(model)


def test_int8_export_vision_is_the_calibrated_graph_with_attention_and_gelu_fused(exported):
    """The int8 export's vision.onnx runs on ONNX Runtime only (TensorRT builds calibrate their own from an fp32
    export): its attention and GELU are ONNX Runtime's fused ops, its Q/DQ the calibrated graph's on the matmuls'
    inputs."""
    model = onnx.load(exported("qwen2", "int8") / "vision.onnx")
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MultiHeadAttention") == ops.count("Gelu") - 1 > 0 and "Softmax" not in ops and "Erf" not in ops
    assert {(n.domain, n.op_type) for n in model.graph.node} - {("", op) for op in ops} == {
        ("com.microsoft", "MultiHeadAttention"), ("com.microsoft", "Gelu")}
    _assert_symmetric_qdq_with_fp32_attention(model)
    producer = {out: node for node in model.graph.node for out in node.output}
    assert not any(producer[n.input[0]].op_type == "MatMul" for n in model.graph.node
                   if n.op_type == "QuantizeLinear" and n.input[0] in producer), "matmul outputs stay fp32"
    manifest = json.loads((exported("qwen2", "int8") / "manifest.json").read_text())
    assert "MultiHeadAttention" in manifest["quantization"]["vision"]


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_vision_amx_is_the_int8_vision_graph_with_edgevls_attention(exported, precision, monkeypatch, tmp_path):
    """vision_amx.onnx, which CPUs with AMX run: vision.onnx with each MultiHeadAttention as edgevl's, reading the
    same data file. Its image embeddings: vision.onnx's to bf16 attention's rounding where the op runs on AMX-BF16
    tiles, bit for bit elsewhere (ONNX Runtime's kernel inside the op). The backend takes it where edgevl.cpu says."""
    out = exported("qwen2", precision)
    manifest = read_manifest(out)
    assert manifest.graphs.vision_amx == "vision_amx.onnx" and "bf16" in manifest.quantization["vision"]
    graphs = {name: onnx.load(out / name, load_external_data=False).graph for name in ("vision.onnx",
                                                                                      "vision_amx.onnx")}
    attention = {name: [n.domain for n in g.node if n.op_type == "MultiHeadAttention"] for name, g in graphs.items()}
    assert attention == {"vision.onnx": ["com.microsoft"] * manifest.spec.vision.num_layers,
                         "vision_amx.onnx": ["edgevl"] * manifest.spec.vision.num_layers}
    for graph in graphs.values():
        assert {e.value for t in graph.initializer for e in t.external_data if e.key == "location"} == {
            "vision.onnx.data"}
    if cpu.matmul_library() is None:
        pytest.skip("edgevl's ops are not installed here (x86-64 with AVX2 and FMA, a C compiler at install)")
    tiles = preprocess_image(synthetic_image(900, 500), manifest.spec.tiling)
    embeddings = {}
    for vision in (None, "AMX-BF16"):
        monkeypatch.setattr("edgevl.backends.onnxruntime_backend.integer_gemm",
                            lambda v=vision: replace(cpu.integer_gemm(), vision_attention=v))
        backend = OnnxRuntimeBackend(out, manifest)
        assert backend.vision_graph == ("vision_amx.onnx" if vision else "vision.onnx")
        embeddings[vision] = backend.encode_images(tiles)
    plain, amx = embeddings.values()
    if precision == "int8":  # an export made before vision_amx.onnx: vision.onnx whatever the CPU
        older = _copy(out, tmp_path / "older")
        record = json.loads((older / "manifest.json").read_text())
        del record["graphs"]["vision_amx"]
        (older / "manifest.json").write_text(json.dumps(record))
        assert OnnxRuntimeBackend(older, read_manifest(older)).vision_graph == "vision.onnx"
    if not cpu.attention_tiles():
        np.testing.assert_array_equal(amx, plain)
        return
    # Per tile, as the drift figures: 0.99984 on these tiny models (int8 against fp32: 0.9996); wrong arithmetic
    # gives far less.
    worst = min(cosine(a, p) for a, p in zip(amx, plain))
    assert 0.999 < worst < 1, worst


def _assert_symmetric_qdq_with_fp32_attention(model):
    zero_points = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) == 3:
            assert not zero_points[node.input[2]].any(), f"{node.name}: TensorRT needs zero points of 0"
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") and "LayerNorm" in n.name
                   for n in model.graph.node)
    # Attention reads fp32, not dequantized int8: its activation x activation MatMuls (Q x K^T, probabilities x V),
    # or the MultiHeadAttention nodes they were fused into.
    weights = {init.name for init in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    dequantized = {out for n in model.graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    attention = [n for n in model.graph.node if n.op_type == "MultiHeadAttention" or n.op_type == "MatMul" and not (
        n.input[1] in dequantized and producer[n.input[1]].input[0] in weights)]
    inputs = {i for n in attention for i in n.input} | {i for n in model.graph.node if n.op_type == "Split"
                                                        for i in n.input}
    assert attention and not inputs & dequantized


def test_vision_calibration_ranges_equal_quantize_statics_own(exported, tmp_path):
    """calibrate_vision (one tile per run, tensors freed as soon as they are reduced) measures exactly the ranges
    ONNX Runtime's calibrator gives quantize_static, which the int8 vision graph is built from."""
    from onnxruntime.quantization.calibrate import create_calibrator

    from edgevl.export.quantize import VISION_QUANTIZED_OPS, calibrate_vision, calibration_tiles
    from edgevl.manifest import read_manifest

    path = exported("qwen2") / "vision.onnx"
    tiles = calibration_tiles(None, read_manifest(path.parent).spec.tiling, max_tiles=3)
    ours = calibrate_vision(path, tiles, tmp_path, log=lambda _: None)

    class Reader:
        def __init__(self):
            self._it = iter({"pixel_values": tiles[i:i + 1]} for i in range(len(tiles)))

        def get_next(self):
            return next(self._it, None)

    theirs = create_calibrator(path, VISION_QUANTIZED_OPS, augmented_model_path=str(tmp_path / "theirs.onnx"))
    theirs.collect_data(Reader())
    theirs = theirs.compute_data()
    assert set(ours.data) == set(theirs.data) and ours.data
    for name, expected in theirs.data.items():
        for got, want in zip(ours.data[name].range_value, expected.range_value):
            np.testing.assert_array_equal(got, want, err_msg=name)


def test_each_steps_logits_stay_the_callers_own(exported):
    """The shared-KV backend binds one logits buffer for every step: what a step returned must not change when
    the next step runs."""
    backend = EdgeVL.from_pretrained(exported("qwen2", "int8")).backend
    first = backend.prefill(backend.embed_tokens(np.arange(12)))
    kept = first.copy()
    second = backend.decode(int(np.argmax(first)))
    assert not np.array_equal(second, kept)
    np.testing.assert_array_equal(first, kept)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_exports_run_and_record_bounded_drift(exported, precision):
    out = exported("qwen2", precision)
    manifest = json.loads((out / "manifest.json").read_text())
    drift = manifest["drift_vs_fp32"]
    assert manifest["precision"] == {"vision": "int8", "decoder": precision}
    for metric, floor in EXPORT_PRECISIONS[precision].drift_bounds.items():
        assert drift[metric] >= floor, metric
    # Only the quantized graphs: no fp32 weights left behind from the export it was made from. The decoder and the
    # vision graph keep their weights in data files that decoder_avx2.onnx and vision_amx.onnx share.
    assert sorted(p.name for p in out.glob("*.onnx.data")) == ["decoder.onnx.data", "vision.onnx.data"]
    assert manifest["graphs"].get("decoder_avx2") == "decoder_avx2.onnx"
    assert sorted(manifest["files"]) == sorted(p.name for p in out.iterdir() if p.name != "manifest.json")
    assert "decoder_fixed" not in manifest["graphs"] and "decoder_fixed" not in manifest["kv_cache"]
    assert manifest["kv_cache"]["layout"] == "shared"  # qwen2: GroupQueryAttention over one buffer per tensor
    graph = onnx.load(out / "decoder.onnx").graph
    weights = {init.name for init in graph.initializer}
    # Every weight matmul is quantized (4 per layer + lm_head); attention's activation matmuls are not. At int8
    # the lm_head, which only ever sees the last position, is the one DynamicQuantizeMatMul.
    ops = [n.op_type for n in graph.node]
    if precision == "int8":
        assert ops.count("MatMulIntegerToFloat") == 4 * 2 and ops.count("DynamicQuantizeMatMul") == 1
    else:
        assert ops.count("MatMulNBits") == 4 * 2 + 1
    assert not any(n.op_type == "MatMul" and set(n.input) & weights for n in graph.node)
    assert not any(init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 2 and min(init.dims) > 8
                   for init in graph.initializer), "an fp32 weight matrix left in the quantized decoder"
    # Two RMSNorms per layer + the final one, each fused into one node.
    assert sum(n.op_type == "SimplifiedLayerNormalization" for n in graph.node) == 2 * 2 + 1
    assert not any(n.op_type in ("Pow", "Reciprocal") for n in graph.node)
    model = EdgeVL.from_pretrained(out)
    first = model.generate("Describe.", synthetic_image(640, 480), max_new_tokens=8)
    assert first.token_ids
    # The shared KV buffers still hold this run's rows when the next one starts: it must not read them.
    model.generate("Something else, and longer than the first question.", max_new_tokens=12)
    again = model.generate("Describe.", synthetic_image(640, 480), max_new_tokens=8)
    assert again.token_ids == first.token_ids


@pytest.mark.skipif(cpu.matmul_library() is None, reason="edgevl's Int8MatMul / Int4MatMul are not installed or cannot "
                    "run here (x86-64 with AVX2 and FMA, a C compiler when edgevl was installed)")
@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_avx2_gives_the_decoders_logits(exported, family, precision, monkeypatch, tmp_path):
    """The graph x86 CPUs without VNNI, with AVX-512 VNNI and with AMX run: every weight matmul on edgevl's Int8MatMul
    (int8: the same integers and scaling as decoder.onnx's) or Int4MatMul (int4: MatMulNBits' arithmetic, summed in
    another order), every attention on edgevl's GroupQueryAttention (ONNX Runtime's kernel for prefill, edgevl's for
    the decode step: the same attention summed in another order). Prefill (chunked): int8 logits the same bit for
    bit; decode steps and int4: the same to float rounding. Chosen here whatever this CPU is (OnnxRuntimeBackend's
    edgevl_ops)."""
    out = exported(family, precision)
    graph = onnx.load(out / "decoder_avx2.onnx", load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    op, replaced = ("Int8MatMul", {"MatMulIntegerToFloat", "DynamicQuantizeMatMul"}) if precision == "int8" else (
        "Int4MatMul", {"MatMulNBits"})
    assert ops.count(op) == 4 * 2 + 1 and not replaced & set(ops)
    # each layer's SwiGLU and both residual Adds (Qwen2's QKV bias too) folded into the matmuls before them
    assert not {"Split", "Sigmoid", "Mul"} & set(ops)
    epilogues = sorted((len(n.input), [a.i for a in n.attribute if a.name == "swiglu"]) for n in graph.node
                       if n.op_type == op)
    bias = [(4, [])] * 2 if family == "qwen2" else [(3, [])] * 2
    assert epilogues == sorted([(3, []), *bias, *[(3, [1])] * 2, *[(5, [])] * 4]), epilogues
    assert [n.domain for n in graph.node if n.op_type == "GroupQueryAttention"] == ["edgevl"] * 2
    assert {e.value for t in graph.initializer for e in t.external_data if e.key == "location"} == {"decoder.onnx.data"}
    standard, avx2 = (OnnxRuntimeBackend(out, read_manifest(out), edgevl_ops=ops) for ops in (False, True))
    assert (standard.decoder_graph, avx2.decoder_graph) == ("decoder.onnx", "decoder_avx2.onnx")
    prompt = standard.embed_tokens(np.arange(3, 3 + 300) % 97)  # two prefill chunks
    logits = [(b.prefill(prompt), b.decode(5), b.decode(11)) for b in (standard, avx2)]
    for step, (got, want) in enumerate(zip(*logits)):
        if precision == "int8" and step == 0:
            np.testing.assert_array_equal(got, want)
            continue
        # int4: each matmul agrees with MatMulNBits to float rounding (tests/test_cpu_graph.py); through a model,
        # activations re-quantized per block turn rounding into code flips. On these tiny models MatMulNBits' own
        # logits differ that much between MLAS's AVX2 and VNNI kernels: up to 0.7% of the largest logit, cosine
        # 1 - 3e-5; Int4MatMul against either: up to 0.9%, 1 - 5e-5. int8 decode steps: attention's rounding, then
        # the same per-token re-quantization. Wrong arithmetic is ~100% off.
        cosine = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
        assert cosine > 0.999 and np.abs(got - want).max() <= 3e-2 * np.abs(want).max()
    if family == "qwen2" and precision == "int8":  # an export made before decoder_avx2.onnx: decoder.onnx, exact
        older = _copy(out, tmp_path / "older")
        manifest = json.loads((older / "manifest.json").read_text())
        del manifest["graphs"]["decoder_avx2"]
        (older / "manifest.json").write_text(json.dumps(manifest))
        monkeypatch.setattr("edgevl.backends.onnxruntime_backend.integer_gemm",
                            lambda: replace(cpu.integer_gemm(), edgevl_decoders=("int8",)))
        assert EdgeVL.from_pretrained(older).backend.decoder_graph == "decoder.onnx"
        with pytest.raises(ValueError, match="has no decoder graph on edgevl's ops"):  # asked for, it is an error
            OnnxRuntimeBackend(older, read_manifest(older), edgevl_ops=True)


def _copy(src, dst):
    return shutil.copytree(src, dst)


def test_incomplete_export_names_the_missing_file(exported, tmp_path):
    d = _copy(exported("qwen2"), tmp_path / "e")
    (d / "decoder.onnx").unlink()
    with pytest.raises(ExportError, match=r"decoder\.onnx: listed in manifest\.json but missing"):
        EdgeVL.from_pretrained(d)


def test_corrupted_file_fails_its_checksum(exported, tmp_path):
    d = _copy(exported("qwen2"), tmp_path / "e")
    data = bytearray((d / "vision.onnx").read_bytes())
    data[-10] ^= 0xFF
    (d / "vision.onnx").write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"vision\.onnx: sha256 does not match"):
        EdgeVL.from_pretrained(d)


def test_export_from_another_edgevl_version(exported, tmp_path):
    d = _copy(exported("qwen2"), tmp_path / "e")
    manifest = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**manifest, "edgevl_version": "0.0.1"}))
    with pytest.raises(ExportError, match=r"written by edgevl 0\.0\.1.*re-export"):
        EdgeVL.from_pretrained(d)


def test_backend_and_directory_kinds_must_agree(exported, tiny_checkpoint):
    with pytest.raises(ValueError, match="export it first"):
        EdgeVL.from_pretrained(tiny_checkpoint("qwen2"), backend="onnxruntime")
    with pytest.raises(ValueError, match="backend='onnxruntime'"):
        EdgeVL.from_pretrained(exported("qwen2"), backend="torch")
    with pytest.raises(ValueError, match="max_seq=5000"):
        EdgeVL.from_pretrained(exported("qwen2"), max_seq=5000)


def test_cuda_device_without_cuda_provider_is_an_error(exported):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the error path is for CPU-only builds")
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        EdgeVL.from_pretrained(exported("qwen2"), device="cuda")


def test_runtime_does_not_import_torch(exported):
    code = ("import sys, numpy as np; from edgevl import EdgeVL; "
            f"m = EdgeVL.from_pretrained({str(exported('qwen2'))!r}, num_threads=1); "
            "r = m.generate('Hi', np.zeros((64, 64, 3), np.uint8), max_new_tokens=3); "
            "assert r.token_ids; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cli_export_then_generate(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", "--model", str(tiny_checkpoint("phi3")), "--out", str(out)]) == 0
    assert "[export] decoder.onnx" in capsys.readouterr().out
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(synthetic_image(300, 200)).save(image)
    assert main(["generate", "--model", str(out), "--image", str(image), "--prompt", "Hi",
                 "--max-new-tokens", "3", "--threads", "1"]) == 0
    assert main(["export", "--model", str(tiny_checkpoint("phi3")), "--out", str(tmp_path)]) == 2
    assert "not an edgevl export" in capsys.readouterr().err


def test_fp16_export_runs_on_onnxruntime_with_bounded_drift(exported):
    """fp16 graphs with fp32 islands (for ONNX Runtime on CUDA; run here on CPU): fp16 weights, an fp16 KV
    cache, fp32 embeddings in and image embeddings out, drift within the fp16 bounds."""
    out = exported("qwen2", "fp16")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == {"vision": "fp16", "decoder": "fp16"}
    assert manifest["kv_cache"]["dtype"] == "float16"
    for metric, floor in EXPORT_PRECISIONS["fp16"].drift_bounds.items():
        assert manifest["drift_vs_fp32"][metric] >= floor, metric
    for kind in ("vision", "decoder"):
        graph = onnx.load(out / f"{kind}.onnx").graph
        matrices = [t for t in graph.initializer if len(t.dims) == 2 and min(t.dims) > 8]
        assert matrices and all(t.data_type == onnx.TensorProto.FLOAT16 for t in matrices), kind
        assert trt_incompatibilities(onnx.load(out / f"{kind}.onnx")) == []
    model = EdgeVL.from_pretrained(out)
    assert model.generate("Describe.", synthetic_image(640, 480), max_new_tokens=8).token_ids
