"""The benchmark suite end to end in quick mode (tiny random model), the memory planner's arithmetic, and the
random checkpoints with real shapes that `--shape` writes. Timings are not asserted (this is not a timed
test), only that every figure was measured, is consistent, and lands in the JSON, the table and the plots."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from benchmarks.__main__ import main
from benchmarks.plan import DEVICES, decode_bytes_per_token, export_memory, kv_cache_bytes, parameter_counts, plan
from edgevl.cpu import integer_gemm, matmul_library
from edgevl.specs import KNOWN_SPECS

BACKENDS = "transformers,torch,ort-fp32,ort-int8,trt-fp16,ort-cuda-fp16,torch-cuda-fp16"
CONTEXTS = (400, 460, 9000)  # the last is beyond every row's max_seq
MEASURED = ["preprocess_ms", "ttft_ms", "decode_tokens_per_s"]
ROW_FIELDS = ["backend", "runtime", "precision", "available", "model_bytes", "model_dir_bytes", "export_s",
              "export_peak_rss_bytes", "drift", "load_s",
              "preprocess_tiles", "preprocess_ms", "vision_ms", "prompt_tokens", "prompt_text_tokens", "cold_ttft_ms",
              "ttft_ms", "decode_tokens_per_s", "new_tokens", "peak_rss_bytes", "rss_after_load_bytes",
              "peak_device_bytes", "preprocess_gpu_ms", "threads", "roofline", "vs_transformers"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out, cache = tmp_path_factory.mktemp("bench-out"), tmp_path_factory.mktemp("bench-cache")
    capture = []
    import builtins

    real_print = builtins.print
    builtins.print = lambda *a, **k: capture.append(" ".join(map(str, a))) if "file" not in k else real_print(*a, **k)
    try:
        code = main(["run", "--quick", "--backends", BACKENDS, "--out", str(out), "--cache", str(cache),
                     "--contexts", ",".join(map(str, CONTEXTS))])
    finally:
        builtins.print = real_print
    return code, out, json.loads((out / "tiny.json").read_text()), "\n".join(capture)


def _check_stat(stat, repeat):
    assert stat["n"] == len(stat["values"]) >= repeat  # preprocessing is cheap: it gets at least 5
    assert 0 < stat["min"] <= stat["median"] <= stat["max"]


def test_quick_run_measures_every_backend(quick_run):
    code, out, result, _ = quick_run
    assert code == 0
    config = result["config"]
    assert config["tiles"] == [1, 2] and config["quick"] and config["backends"] == BACKENDS.split(",")
    rows = {r["backend"]: r for r in result["rows"]}
    assert list(rows) == BACKENDS.split(",")
    for name in ("transformers", "torch", "ort-fp32", "ort-int8"):
        row = rows[name]
        assert row["available"], row.get("reason")
        assert not [f for f in ROW_FIELDS if f not in row], name
        for key in MEASURED:
            _check_stat(row[key], config["repeat"])
        assert set(row["vision_ms"]) == {"1", "2"}
        for stat in row["vision_ms"].values():
            _check_stat(stat, config["repeat"])
        # 1 tile (256 image tokens) + ~32 text tokens + the template's own tokens
        assert row["prompt_tokens"] >= 256 + config["prompt_tokens"] and row["prompt_text_tokens"] >= 32
        assert row["preprocess_tiles"] == 9  # 1920x1080 -> a 4x2 grid + thumbnail
        assert all(n >= 1 for n in row["new_tokens"])
        assert 0 < row["model_bytes"] <= row["model_dir_bytes"]
        # Own process: at least the model it loaded, and its own figure, not the parent's high-water mark.
        assert row["peak_rss_bytes"] >= row["rss_after_load_bytes"] > 50 << 20
        roof = row["roofline"]
        assert roof["weights_bytes_per_token"] > 0 and roof["ceiling_tokens_per_s"] > 0
        assert roof["fraction"] == pytest.approx(row["decode_tokens_per_s"]["median"] / roof["ceiling_tokens_per_s"])
        assert row["threads"]["threadpools"] is not None
    for name in ("torch", "ort-fp32", "ort-int8"):  # the context curve: edgevl rows
        *points, beyond = rows[name]["context_curve"]
        assert [p["positions"] for p in points] == pytest.approx(CONTEXTS[:-1], abs=3), name
        assert points[0]["prompt_tokens"] < points[1]["prompt_tokens"] < CONTEXTS[1]
        for point in points:
            for key in ("ttft_ms", "prefill_ms", "decode_tokens_per_s"):
                _check_stat(point[key], config["repeat"])
            assert point["rss_bytes"] > 50 << 20
        assert beyond["positions"] == CONTEXTS[-1] and "out of range" in beyond["reason"]
    assert "context_curve" not in rows["transformers"]
    assert rows["transformers"]["vs_transformers"]["ttft"] == pytest.approx(1.0)
    assert rows["ort-fp32"]["vs_transformers"]["decode"] == pytest.approx(
        rows["ort-fp32"]["decode_tokens_per_s"]["median"] / rows["transformers"]["decode_tokens_per_s"]["median"])
    assert rows["torch"]["export_s"] is None and rows["ort-fp32"]["export_s"] > 0
    assert rows["ort-int8"]["precision"] == {"vision": "int8", "decoder": "int8"}
    assert rows["ort-int8"]["drift"]["image_embeds_cosine_min"] > 0.99
    assert rows["ort-fp32"]["threads"]["onnxruntime_providers"] == ["CPUExecutionProvider"]
    # The int8 row names the graphs it ran: edgevl's own ops where this CPU takes them (edgevl.cpu)
    assert (rows["ort-fp32"]["vision_graph"], rows["ort-fp32"]["decoder_graph"]) == ("vision.onnx", "decoder.onnx")
    assert rows["ort-int8"]["decoder_graph"] == ("decoder_avx2.onnx" if "int8" in integer_gemm().edgevl_decoders
                                                 else "decoder.onnx")
    assert rows["ort-int8"]["vision_graph"] == ("vision_amx.onnx" if integer_gemm().vision_attention
                                                else "vision.onnx")
    assert "torch_threads" in rows["torch"]["threads"]
    # The int8 decoder file reads fewer bytes per token than the fp32 one.
    assert rows["ort-int8"]["roofline"]["weights_bytes_per_token"] < rows["ort-fp32"]["roofline"][
        "weights_bytes_per_token"]
    assert not rows["trt-fp16"]["available"] and "TensorRT" in rows["trt-fp16"]["reason"]
    for name in ("ort-cuda-fp16", "torch-cuda-fp16"):  # they run where a GPU is; elsewhere they say why not
        assert rows[name]["available"] or " on CUDA: " in rows[name]["reason"], rows[name]["reason"]
    assert result["bandwidth"]["read_bytes_per_s"] > 1e8
    assert result["machine"]["cpus"] >= 1 and result["machine"]["versions"]["onnxruntime"]
    assert "loadavg_1_5_15" in result["background"]["before"]


def test_quick_run_prints_the_table_and_writes_plots(quick_run):
    _, out, result, printed = quick_run
    assert "| backend | precision (vision/decoder) |" in printed
    for name in ("transformers", "torch", "ort-fp32", "ort-int8"):
        assert f"| {name} |" in printed
    assert "trt-fp16: not available:" in printed
    assert "### Decode roofline" in printed and "### Relative to transformers eager" in printed
    assert "### Cost of context" in printed and f"| ort-int8 | {CONTEXTS[-1]}: out of range " in printed
    written = (out / "tiny.md").read_text()
    assert written.startswith("- command: `python -m benchmarks run --quick")
    assert written[written.index("### Results"):].strip() in printed
    assert "- memory bandwidth" in written and "- also running:" in written
    assert "- ONNX Runtime graphs (vision, decoder): ort-fp32 vision.onnx, decoder.onnx · ort-int8 vision" in written
    pytest.importorskip("matplotlib")
    for name in ("tiny-decode-ttft.png", "tiny-vision.png", "tiny-context.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_two_runs(quick_run, capsys, tmp_path):
    _, out, result, _ = quick_run
    slower = json.loads(json.dumps(result))
    for row in slower["rows"]:
        if row.get("available"):
            row["decode_tokens_per_s"]["median"] /= 2
    (tmp_path / "b.json").write_text(json.dumps(slower))
    assert main(["--compare", str(out / "tiny.json"), str(tmp_path / "b.json")]) == 0
    printed = capsys.readouterr().out
    assert "| ort-int8 | decode tok/s |" in printed
    lines = [l for l in printed.splitlines() if "| decode tok/s |" in l]
    assert len(lines) == 4 and all(l.rstrip(" |").endswith("0.50") for l in lines)
    assert all(l.rstrip(" |").endswith("1.00") for l in printed.splitlines() if "| TTFT ms |" in l)


def test_plan_cli_says_what_fits(capsys):
    assert main(["plan", "--shape", "internvl2-1b", "--device", "orin-nano-8gb", "--precision", "int8",
                 "--max-seq", "4096"]) == 0
    printed = capsys.readouterr().out
    assert "Jetson Orin Nano 8GB" in printed and "FITS" in printed and "KV cache" in printed
    assert main(["plan", "--shape", "internvl2-4b", "--device", "orin-nano-8gb", "--precision", "fp16"]) == 0
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["plan", "--shape", "internvl2-1b", "--device", "cpu", "--ram-gb", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memory_bytes"] == 16 << 30
    assert main(["plan", "--device", "pi-zero"]) == 2
    assert main(["plan", "--shape", "internvl2-2b", "--device", "cpu", "--ram-gb", "24"]) == 0
    printed = capsys.readouterr().out
    assert "Exporting (`edgevl export`" in printed and "free disk of fp32 " in printed
    assert main(["plan", "--shape", "internvl2-2b", "--device", "cpu", "--ram-gb", "24", "--json"]) == 0
    disk = json.loads(capsys.readouterr().out)["export_disk_bytes"]
    fp32_weights = 4 * 2.21e9  # InternVL2-2B: 2.21 B parameters; the export checks the same rule on the files
    assert disk["fp32"] == pytest.approx(1.1 * fp32_weights, rel=0.01)
    assert disk["int8"] == disk["int4"] == pytest.approx(1.5 * fp32_weights, rel=0.01)


def test_export_memory_is_the_largest_stage_and_follows_the_decoder():
    estimates = {shape: export_memory(KNOWN_SPECS[shape], "int8") for shape in ("internvl2-1b", "internvl2-2b",
                                                                                 "internvl2-4b")}
    for stages in estimates.values():
        assert stages["peak"] == max(v for k, v in stages.items() if k != "peak")
    one, two, four = (estimates[s]["peak"] / (1 << 30) for s in estimates)
    assert 3.5 < one < 4.5  # measured: 4.0 GiB (benchmarks/RESULTS.md)
    assert one < two < four < 20  # the 4B's fp32 weights are 15.4 GiB: never two copies of them
    assert export_memory(KNOWN_SPECS["internvl2-1b"], "fp32").keys() == {
        "vision.onnx (torch export process)", "decoder.onnx (torch export process)", "peak"}


def test_plan_arithmetic_on_internvl2_1b():
    spec = KNOWN_SPECS["internvl2-1b"]
    counts = parameter_counts(spec)
    assert 0.93e9 < sum(counts.values()) < 0.95e9  # InternVL2-1B: 0.94 B parameters
    assert counts["vision"] == pytest.approx(304e6 + 4.6e6, rel=0.01)  # InternViT-300M + the MLP projector
    assert counts["embedding"] == counts["lm_head"] == 151655 * 896
    # K and V, 24 layers, 2 KV heads of 64, 4096 positions, fp32
    assert kv_cache_bytes(spec, 4096, 4) == 2 * 24 * 2 * 64 * 4096 * 4
    fp32, int8, int4 = (decode_bytes_per_token(spec, p) for p in ("fp32", "int8", "int4"))
    assert fp32 == pytest.approx(4 * (counts["decoder_matrices"] + counts["lm_head"]), rel=1e-3)
    # int8: per-channel scales; int4: an fp32 scale per 128 weights (0.5 + 4 / 128 bytes per weight)
    assert int8 / fp32 == pytest.approx(1 / 4, rel=1e-3) and int4 / fp32 == pytest.approx(0.53125 / 4, rel=1e-3)
    small, large = (plan(spec, DEVICES["orin-nano-8gb"], "int8", seq) for seq in (1024, 8192))
    assert large["total_bytes"] > small["total_bytes"]
    assert plan(spec, DEVICES["orin-nano-8gb"], "int8", small["largest_max_seq"])["fits"]


def test_shaped_checkpoint_keeps_the_vocabulary_beyond_the_tokenizer(tmp_path, monkeypatch):
    """A real vocabulary with the tiny tokenizer: ids past the tokenizer come out of decoding and must decode to
    nothing rather than fail. A small stand-in shape keeps this test fast."""
    from dataclasses import replace

    from edgevl import EdgeVL
    from edgevl.testing import shaped
    from edgevl.testing.checkpoints import tiny_spec
    from edgevl.synthetic import synthetic_image

    spec = tiny_spec("qwen2", vocab_size=4000)
    monkeypatch.setitem(KNOWN_SPECS, "tiny-test", replace(spec, template="Hermes-2"))
    dirs = shaped.write_shaped_checkpoint(tmp_path, "tiny-test")
    assert set(dirs) == {"original", "hf"}
    models = [EdgeVL.from_pretrained(d) for d in dirs.values()]
    assert [m.spec.decoder for m in models] == [spec.decoder] * 2
    assert models[0].tokenizer.vocab_size < 4000
    results = [m.generate("Describe.", synthetic_image(448, 448), max_new_tokens=24) for m in models]
    assert results[0].token_ids == results[1].token_ids
    assert max(results[0].token_ids) >= models[0].tokenizer.vocab_size, "no id beyond the tokenizer was drawn"
    with pytest.raises(ValueError, match="internvl2-1b"):
        shaped.write_shaped_checkpoint(tmp_path / "x", "internvl9")
    np.testing.assert_array_equal(models[0].backend.embed_tokens(np.array([3999])),
                                  models[1].backend.embed_tokens(np.array([3999])))


def test_tensorrt_rows_build_plans_from_an_fp32_export(monkeypatch, tmp_path):
    """A trt-* row's model is an fp32 export with `edgevl build --precision` plans in it (on a GPU machine)."""
    import edgevl.export
    import edgevl.export.trt
    from benchmarks import models

    calls = []

    def export(model_dir, out, precision, max_tiles, log):
        calls.append(("export", precision))
        Path(out).mkdir(parents=True)

    monkeypatch.setattr(edgevl.export, "export_model", export)
    monkeypatch.setattr(edgevl.export.trt, "build_engines",
                        lambda out, precision, log: calls.append(("build", precision)))
    models._export_main([str(tmp_path / "model"), str(tmp_path / "plans"), "int4-llm", "13", "tensorrt"])
    assert calls == [("export", "fp32"), ("build", "int4-llm")]
    assert json.loads((tmp_path / "plans" / models.EXPORT_RECORD).read_text())["max_tiles"] == 13


def test_a_cached_int8_or_int4_export_an_older_edgevl_made_is_made_again(monkeypatch, tmp_path):
    """Without decoder_avx2.onnx, or with one whose attention is ONNX Runtime's or whose SwiGLU is not folded into
    its matmul (a Split left), or with a vision graph whose attention is not fused: made again; current: reused."""
    import subprocess

    import onnx
    from onnx import helper

    from benchmarks import models

    source = models.ModelSource("tiny", tmp_path / "original", None, tmp_path)
    made = []

    def save(out, name, nodes):
        onnx.save(helper.make_model(helper.make_graph(nodes, "g", [], [])), str(out / name))

    def write(out, attention_domain=None, split=False, vision_op="MultiHeadAttention", amx=True):
        graphs = {"decoder": "decoder.onnx", "vision": "vision.onnx"}
        if attention_domain:
            graphs["decoder_avx2"] = "decoder_avx2.onnx"
            nodes = [helper.make_node("GroupQueryAttention", ["q"], ["y"], domain=attention_domain)]
            nodes += [helper.make_node("Split", ["y"], ["a", "b"], num_outputs=2)] if split else []
            save(out, "decoder_avx2.onnx", nodes)
        save(out, "vision.onnx", [helper.make_node(vision_op, ["x"], ["y"], domain="com.microsoft")])
        if amx:
            graphs["vision_amx"] = "vision_amx.onnx"
            save(out, "vision_amx.onnx", [helper.make_node(vision_op, ["x"], ["y"], domain="edgevl")])
        (out / "manifest.json").write_text(json.dumps({"graphs": graphs}))
        (out / models.EXPORT_RECORD).write_text(json.dumps({"max_tiles": 13, "source": str(source.original),
                                                            "export_s": 1.0, "peak_rss_bytes": 1 << 30}))

    def export(args, **kwargs):  # ensure_export's child: writes the export and its record
        out = Path(args[4])
        out.mkdir()
        write(out, "edgevl")
        made.append(args[5])
        return subprocess.CompletedProcess(args, 0, "")

    monkeypatch.setattr(models.subprocess, "run", export)
    for precision, attention in (("int8", None), ("int4", "com.microsoft"), ("fp32", None)):
        out = source.export_dir(precision)
        out.mkdir()
        write(out, attention)
        assert models.ensure_export(source, precision, 13, log=lambda _: None)[0] == out
    assert made == ["int8", "int4"]  # fp32 exports have no decoder_avx2.onnx: kept
    for precision in ("int8", "int4"):
        models.ensure_export(source, precision, 13, log=lambda _: None)
    assert made == ["int8", "int4"]  # now current: reused
    shutil.rmtree(source.export_dir("int8"))
    source.export_dir("int8").mkdir()
    write(source.export_dir("int8"), "edgevl", split=True)
    models.ensure_export(source, "int8", 13, log=lambda _: None)
    assert made == ["int8", "int4", "int8"]
    write(source.export_dir("int4"), "edgevl", vision_op="Attention")
    models.ensure_export(source, "int4", 13, log=lambda _: None)
    assert made == ["int8", "int4", "int8", "int4"]
    write(source.export_dir("int8"), "edgevl", amx=False)
    models.ensure_export(source, "int8", 13, log=lambda _: None)
    assert made == ["int8", "int4", "int8", "int4", "int8"]


def test_decode_profile_splits_a_token_by_op_type(exported, capsys):
    from benchmarks.profile import WARMUP_STEPS, decode_profile

    export = exported("qwen2", "int8")
    profile = decode_profile(export, positions=20, steps=WARMUP_STEPS + 4, threads=1)
    assert profile["tokens"] == 4 and profile["precision"] == "int8"
    ops = profile["ops_ms"]
    # the int8 decoder's weight matmuls and its fused attention (export/cpu_graph.py) are what a token runs; on x86
    # without VNNI and on AVX-512 VNNI the matmuls are edgevl's Int8MatMul (decoder_avx2.onnx)
    avx2 = "int8" in integer_gemm().edgevl_decoders
    assert profile["graph"] == ("decoder_avx2.onnx" if avx2 else "decoder.onnx")
    matmuls = {"Int8MatMul"} if avx2 else {"MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
    assert matmuls | {"GroupQueryAttention"} <= set(ops)
    assert all(ms > 0 for ms in ops.values())
    assert sum(ops.values()) == pytest.approx(profile["nodes_ms"])
    assert profile["nodes_ms"] < profile["model_run_ms"]
    assert main(["profile", str(export), "--positions", "20", "--steps", "4"]) == 0
    printed = capsys.readouterr().out
    assert all(f"| {op} |" in printed for op in matmuls)
    assert main(["profile", str(export), "--steps", str(WARMUP_STEPS)]) == 2
    assert main(["profile", str(export), "--positions", "100000"]) == 2
    assert "max_seq" in capsys.readouterr().err


@pytest.mark.skipif(matmul_library() is None, reason="edgevl's Int8MatMul / Int4MatMul are not installed or cannot "
                    "run here (x86-64 with AVX2 and FMA, a C compiler when edgevl was installed)")
def test_decoders_times_both_graphs_of_an_export_in_turns(exported, capsys):
    from benchmarks.decoders import GRAPHS, compare_decoders

    export = exported("qwen2", "int8")
    result = compare_decoders(export, positions=20, steps=3, alternations=2, threads=1)
    assert set(result["graphs"]) == set(GRAPHS.values())
    assert all(len(t["decode_ms"]) == len(t["prefill_ms"]) == 2 and min(t["decode_ms"]) > 0
               for t in result["graphs"].values())
    assert result["same_leading_tokens"] == result["tokens"] == 4  # int8: the same integers on either graph
    assert result["default_graph"] == ("decoder_avx2.onnx" if "int8" in integer_gemm().edgevl_decoders
                                       else "decoder.onnx")
    assert main(["decoders", str(export), "--positions", "20", "--steps", "2", "--alternations", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| decoder_avx2.onnx (edgevl's ops) |" in printed and "of 1 pairs" in printed
    assert "greedy tokens: all 3 the same" in printed and "`python -m benchmarks decoders " in printed
    assert main(["decoders", str(exported("qwen2")), "--steps", "2"]) == 2  # fp32: no decoder_avx2.onnx
    assert "has no decoder_avx2.onnx" in capsys.readouterr().err


def test_gemv_checks_each_integer_formulation_against_exact_integers(capsys):
    from benchmarks.gemv import available_formulations, probe_error

    # u8 x u8 and 7-bit activations never saturate an int16 pair sum (255 * 255 widened; 127 * 127 * 2 < 32767)
    assert probe_error("u8u8") == 0 and probe_error("u8s8-7bit") == 0
    # full-range u8 x s8 is exact exactly where edgevl.cpu measured it so (VNNI, AMX, ARM), wrong elsewhere
    assert (probe_error("u8s8") == 0) == integer_gemm().u8s8_exact
    # they quantize the activations themselves: no integer product
    assert probe_error("nbits8") is None and probe_error("nbits4") is None and probe_error("edgevl-int4") is None
    if matmul_library() is not None:
        assert probe_error("edgevl") == 0  # the sign trick: exact on every x86 class with AVX2
    assert main(["gemv", "--layers", "1", "--repeat", "2", "--threads", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["matrices"] == 2 and result["weight_bytes"] == 896 * 9728 + 4864 * 896
    assert tuple(result["formulations"]) == available_formulations()
    assert all(r["s"] > 0 and r["gb_per_s"] > 0 for r in result["formulations"].values())
    assert main(["gemv", "--layers", "1", "--repeat", "1", "--formulations", "u8u8"]) == 0
    assert "| u8u8 |" in capsys.readouterr().out
