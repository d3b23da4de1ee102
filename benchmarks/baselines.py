"""The two alternatives a CPU user of edgevl has, measured on the same checkpoint and thread count: llama.cpp
(GGUF F32 / Q8_0 / Q4_0 through llama-bench and llama-mtmd-cli) and onnxruntime-genai (its model builder's int8 /
int4 MatMulNBits). See benchmarks/README.md for setting the two tools up.

    python -m benchmarks.baselines --llama-cpp llama.cpp/build --ortgenai-python ogvenv/bin/python \\
        --model ~/.cache/edgevl-benchmarks/internvl2-1b-seed0/original --out baselines-results

Nothing is installed or built here: a missing tool is reported with what to do, and its rows are skipped.
Conversions are cached under --out. The machine is shared with other benchmarks, so every measurement holds
/tmp/edgevl-cpu.lock exclusively and every conversion holds it shared (the same lock `flock -x/-s` takes).
Top-level imports are the standard library only: the onnxruntime-genai worker runs this module in its own venv."""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CPU_LOCK = "/tmp/edgevl-cpu.lock"
LLAMA_TOOLS = ("llama-bench", "llama-quantize", "llama-mtmd-cli")
# text GGUF type -> the mmproj type the vision row uses (the converter writes f32/f16/bf16/q8_0 mmprojs, no q4)
LLAMA_ROWS = {"F32": "f32", "Q8_0": "q8_0", "Q4_0": "q8_0"}
ORTGENAI_ROWS = ("int8", "int4")
LLAMA_SETUP = ("build it: cmake -S llama.cpp -B llama.cpp/build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON "
               "-DLLAMA_OPENSSL=OFF && cmake --build llama.cpp/build --target " + " ".join(LLAMA_TOOLS) +
               " (benchmarks/README.md, 'Baselines')")
ORTGENAI_SETUP = ("python -m venv ogvenv && ogvenv/bin/pip install onnxruntime-genai torch transformers onnx onnx-ir "
                  "(its own venv: onnxruntime-genai pins its onnxruntime; benchmarks/README.md, 'Baselines')")

# The checkpoints here carry a small made-up BPE tokenizer, whose pre-tokenizer hash the converter refuses. The
# shapes are Qwen2's, so it is told the tokenizer is Qwen2's; llama-bench feeds token ids and never tokenizes.
_CONVERT = r"""
import runpy, sys
src = sys.argv.pop(1)
sys.path[:0] = [src, src + '/gguf-py']
from conversion import base
known = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return 'qwen2'
base.TextModel.get_vocab_base_pre = pre
sys.argv[0] = src + '/convert_hf_to_gguf.py'
runpy.run_path(sys.argv[0], run_name='__main__')
"""


@contextmanager
def cpu_lock(exclusive: bool):
    with open(CPU_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_logged(cmd: list, log_path: Path, timed: bool, **kwargs) -> subprocess.CompletedProcess:
    """Run under the CPU lock; stdout is returned, stderr kept in log_path. Raises with the log's tail on failure."""
    with cpu_lock(exclusive=timed), open(log_path, "w") as log:
        proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=log, text=True, **kwargs)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        status = (f"was killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
                  else f"exited {proc.returncode}")
        raise RuntimeError(f"{Path(str(cmd[0])).name} {status} (log {log_path}):\n" + "\n".join(tail))
    return proc


def cached(path: Path, make) -> Path:
    """make(tmp_path) writes the file or folder; renamed into place only when it succeeded."""
    if not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        make(tmp)
        tmp.rename(path)
    return path


def size_mib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / (1 << 20), 1)


def spread(values: list[float], digits: int = 1) -> dict:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "samples": [round(v, digits) for v in values]}


# ---- the text model as a plain Qwen2 checkpoint: what both tools' converters take -------------------------------

def write_qwen2_dir(model: Path, out: Path, dtype: str = "float32") -> Path:
    """The decoder of an InternVL checkpoint (either format, any family) as a Qwen2ForCausalLM checkpoint: the
    tools' converters take that, onnxruntime-genai's builder has no InternVL architecture, and one source keeps both
    tools on the same weights. Qwen2 is a Llama decoder with q/k/v biases, so InternLM2 (packed wqkv) and Phi-3
    (fused qkv and gate/up) map onto it exactly with zero biases, read through edgevl's own loader. Phi-3's LongRoPE
    becomes plain RoPE at its short factors: the same work per token, slightly different numbers, which a speed
    comparison on random weights does not read. dtype: float32, or float16 (half the disk, and half the memory
    onnxruntime-genai's builder loads it into: both tools quantize from it, so their rows do not change)."""
    from edgevl.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(model)
    d = checkpoint.spec.decoder

    def make(tmp: Path):
        import numpy as np
        from safetensors.numpy import save_file

        tmp.mkdir(parents=True)
        config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "torch_dtype": dtype,
                  "hidden_size": d.hidden_size, "intermediate_size": d.intermediate_size,
                  "num_hidden_layers": d.num_layers, "num_attention_heads": d.num_heads,
                  "num_key_value_heads": d.num_kv_heads, "vocab_size": d.vocab_size, "rms_norm_eps": d.rms_norm_eps,
                  "rope_theta": d.rope_theta, "max_position_embeddings": d.max_position_embeddings,
                  "tie_word_embeddings": False, "hidden_act": "silu", "use_sliding_window": False}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        weights = checkpoint.weights

        def get(name):
            return np.ascontiguousarray(np.asarray(weights[name], dtype=np.dtype(dtype)))

        q_rows, kv_rows = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim

        def layer(i: int) -> dict:
            ours, theirs = f"decoder.layers.{i}.", f"model.layers.{i}."
            qkv = get(ours + "qkv.weight")
            bias = get(ours + "qkv.bias") if d.qkv_bias else np.zeros(len(qkv), np.float32)
            tensors = {}
            for name, rows in zip("qkv", np.split(np.arange(len(qkv)), [q_rows, q_rows + kv_rows])):
                tensors[f"{theirs}self_attn.{name}_proj.weight"] = qkv[rows]
                tensors[f"{theirs}self_attn.{name}_proj.bias"] = bias[rows]
            gate, up = np.split(get(ours + "gate_up.weight"), 2)
            return {**tensors, f"{theirs}self_attn.o_proj.weight": get(ours + "o.weight"),
                    f"{theirs}mlp.gate_proj.weight": gate, f"{theirs}mlp.up_proj.weight": up,
                    f"{theirs}mlp.down_proj.weight": get(ours + "down.weight"),
                    f"{theirs}input_layernorm.weight": get(ours + "attn_norm.weight"),
                    f"{theirs}post_attention_layernorm.weight": get(ours + "mlp_norm.weight")}

        # One shard per part (embeddings, each layer, head), written as it is made: the 4B's fp32 decoder is 15 GB,
        # and a shard's bytes are copied once more when it is written.
        parts = [lambda: {"model.embed_tokens.weight": get("decoder.embed.weight")},
                 *(lambda i=i: layer(i) for i in range(d.num_layers)),
                 lambda: {"model.norm.weight": get("decoder.norm.weight"),
                          "lm_head.weight": get("decoder.lm_head.weight")}]
        index = {}
        with cpu_lock(exclusive=False):
            for n, part in enumerate(parts):
                name = f"model-{n + 1:05d}-of-{len(parts):05d}.safetensors"
                tensors = part()
                save_file(tensors, tmp / name, metadata={"format": "pt"})
                index.update(dict.fromkeys(tensors, name))
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
            if (model / name).exists():
                shutil.copy(model / name, tmp / name)

    return cached(out / f"qwen2-hf-{dtype}", make)


# ---- llama.cpp ---------------------------------------------------------------------------------------------------

def llama_source_dir(build: Path) -> Path:
    cache = build / "CMakeCache.txt"
    if cache.exists():
        for line in cache.read_text(errors="replace").splitlines():
            if line.startswith("CMAKE_HOME_DIRECTORY:"):
                return Path(line.split("=", 1)[1])
    return build.parent


def llama_missing(build: Path | None) -> str | None:
    if build is None:
        return "no --llama-cpp given; " + LLAMA_SETUP
    missing = [t for t in LLAMA_TOOLS if not (build / "bin" / t).exists()]
    if missing:
        return f"{build}/bin lacks {', '.join(missing)}; " + LLAMA_SETUP
    if not (llama_source_dir(build) / "convert_hf_to_gguf.py").exists():
        return f"no convert_hf_to_gguf.py in {llama_source_dir(build)} (the source tree {build} was built from)"
    return None


def mmproj_source_dir(model: Path, out: Path) -> Path:
    """The checkpoint's files linked, plus a preprocessor_config.json where it has none (the --mmproj converter
    reads image_mean/std from it; OpenGVLab's InternVL2 repos ship one with ImageNet's, as edgevl uses)."""
    def make(tmp: Path):
        from edgevl.preprocess import IMAGENET_MEAN, IMAGENET_STD

        tmp.mkdir(parents=True)
        for f in model.iterdir():
            (tmp / f.name).symlink_to(f)
        if not (model / "preprocessor_config.json").exists():
            (tmp / "preprocessor_config.json").write_text(json.dumps(
                {"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}))

    return cached(out / "mmproj-source", make)


def llama_convert(build: Path, model: Path, qwen2, out: Path, types) -> dict:
    """{text type: (text gguf, mmproj gguf)} for `types`, converted once and cached. qwen2() writes (or finds) the
    Qwen2 checkpoint; it and the F32 GGUF the others are quantized from are made only when a file is missing (the
    4B's are 15 GB each)."""
    src, bin_dir = llama_source_dir(build), build / "bin"
    out.mkdir(parents=True, exist_ok=True)

    def convert(source, outtype: str, *extra):
        return lambda tmp: run_logged([sys.executable, "-c", _CONVERT, src, source(), "--outtype", outtype,
                                       "--outfile", tmp, *extra], tmp.with_suffix(".log"), timed=False)

    vision_src = mmproj_source_dir(model, out)
    f32 = lambda: cached(out / "text-F32.gguf", convert(qwen2, "f32"))  # noqa: E731
    files = {}
    for text_type in types:
        mmproj_type = LLAMA_ROWS[text_type]
        text = f32() if text_type == "F32" else cached(
            out / f"text-{text_type}.gguf", lambda tmp, t=text_type: run_logged(
                [bin_dir / "llama-quantize", f32(), tmp, t, "2"], tmp.with_suffix(".log"), timed=False))
        mmproj = cached(out / f"mmproj-{mmproj_type}.gguf", convert(lambda: vision_src, mmproj_type, "--mmproj"))
        files[text_type] = (text, mmproj)
    return files


def llama_bench(build: Path, gguf: Path, args, log_dir: Path) -> dict:
    """Prefill of the prompt and decode at depth 0 in one llama-bench call, decode after the prompt (-d) in a
    second: {"pp", "tg", "tg_at_depth": (tokens, [ns per repeat]), "commit"}. llama-bench warms up each test
    before its -r repeats. One model per call, so a crash costs one row."""
    common = [build / "bin" / "llama-bench", "-m", gguf, "-t", args.threads, "-r", args.repeat, "-o", "json",
              "--repack", 0 if args.llama_no_repack else 1]
    found: dict = {}
    for tag, extra in (("pp-tg", ["-p", args.prompt_tokens, "-n", args.new_tokens]),
                       ("tg-at-depth", ["-p", 0, "-n", args.new_tokens, "-d", args.prompt_tokens])):
        proc = run_logged(common + extra, log_dir / f"llama-bench-{gguf.stem}-{tag}.log", timed=True)
        for test in json.loads(proc.stdout):
            found["commit"] = test.get("build_commit")
            key = "pp" if test["n_prompt"] else ("tg_at_depth" if test["n_depth"] else "tg")
            found[key] = (test["n_prompt"] or test["n_gen"], test["samples_ns"])
    return found


def write_test_image(path: Path, size: int = 448) -> Path:
    """A size x size PPM (stb_image reads it; no imaging library needed): one tile, as InternVL tiles at 448."""
    if not path.exists():
        rng = random.Random(0)
        path.write_bytes(f"P6 {size} {size} 255\n".encode() + bytes(rng.randrange(256) for _ in range(size * size * 3)))
    return path


def llama_vision(build: Path, text: Path, mmproj: Path, args, image: Path, log_path: Path) -> dict:
    """ms per tile from llama-mtmd-cli's 'mtmd batch encoding done in N ms': one process, the image given
    repeat + 1 times (text between them, so each is its own batch of one 448x448 overview tile; mtmd slices only
    images larger than a tile), the first dropped as the warm-up."""
    run_logged([build / "bin" / "llama-mtmd-cli", "-m", text, "--mmproj", mmproj, "--image",
                ",".join([str(image)] * (args.repeat + 1)), "-p", "Describe.", "-n", 1, "-t", args.threads,
                "-c", 4096, "--chat-template", "chatml", "--temp", 0,
                "--no-repack" if args.llama_no_repack else "--repack"],
               log_path, timed=True)
    log_text = log_path.read_text(errors="replace")
    encoded = [float(ms) for ms in re.findall(r"mtmd batch encoding done in (\d+) ms", log_text)]
    batches = re.findall(r"encoding mtmd batch, n_chunks = (\d+)", log_text)
    if len(encoded) != args.repeat + 1 or set(batches) != {"1"}:
        raise RuntimeError(f"expected {args.repeat + 1} one-image 'mtmd batch encoding done' lines in {log_path}, "
                           f"found {len(encoded)} (batches of {batches} images)")
    return spread(encoded[1:])


def llama_rows(args, log) -> list[dict]:
    reason = llama_missing(args.llama_cpp)
    if reason:
        log(f"[baselines] llama.cpp skipped: {reason}")
        return [{"tool": "llama.cpp", "precision": p, "skipped": reason} for p in args.llama_types]
    build, out = args.llama_cpp.resolve(), args.out / "llama.cpp"
    log("[baselines] llama.cpp: converting (cached) ...")
    files = llama_convert(build, args.model, lambda: write_qwen2_dir(args.model, args.out, args.source_dtype), out,
                          args.llama_types)
    image = write_test_image(out / "tile-448.ppm")
    rows = []
    for precision, (text, mmproj) in files.items():
        log(f"[baselines] llama.cpp {precision}: llama-bench, then vision ({mmproj.name}) ...")
        try:
            row = llama_row(build, precision, text, mmproj, args, image, out)
        except RuntimeError as e:  # e.g. a crash in one kernel: that row says so, the others still run
            log(f"[baselines] llama.cpp {precision}: {e}")
            row = {"tool": "llama.cpp", "precision": precision, "skipped": f"failed: {e}"}
        rows.append(row)
    return rows


def llama_row(build: Path, precision: str, text: Path, mmproj: Path, args, image: Path, out: Path) -> dict:
    found = llama_bench(build, text, args, out)
    pp_ms = [ns / 1e6 for ns in found["pp"][1]]
    step_ms = [ns / 1e6 / found["tg_at_depth"][0] for ns in found["tg_at_depth"][1]]
    row = {"tool": "llama.cpp", "precision": precision, "repack": not args.llama_no_repack,
           "version": f"llama.cpp {found['commit']}", "weights_mib": size_mib(text), "prefill_ms": spread(pp_ms),
           # llama-bench has no TTFT: the prompt's prefill plus one decode step after it
           "ttft_ms": spread([pp + statistics.median(step_ms) for pp in pp_ms]), "ttft_derived": True,
           "decode_tok_s": spread([1e3 / ms for ms in step_ms], 2),
           "decode_tok_s_empty_context": spread([found["tg"][0] / (ns / 1e9) for ns in found["tg"][1]], 2),
           "mmproj": mmproj.name, "mmproj_mib": size_mib(mmproj)}
    try:
        row["vision_ms_per_tile"] = llama_vision(build, text, mmproj, args, image, out / f"mtmd-{precision}.log")
    except RuntimeError as e:
        row["vision_error"] = str(e)
    return row


# ---- onnxruntime-genai -------------------------------------------------------------------------------------------

def ortgenai_missing(python: Path | None) -> str | None:
    if python is None:
        return "no --ortgenai-python given; " + ORTGENAI_SETUP
    probe = subprocess.run([str(python), "-c", "import onnxruntime_genai, onnx_ir, torch, transformers"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"{python} cannot import onnxruntime_genai and its builder's needs ({last}); " + ORTGENAI_SETUP
    return None


def ortgenai_rows(args, log) -> list[dict]:
    reason = ortgenai_missing(args.ortgenai_python)
    if reason:
        log(f"[baselines] onnxruntime-genai skipped: {reason}")
        return [{"tool": "onnxruntime-genai", "precision": p, "skipped": reason} for p in ORTGENAI_ROWS]
    qwen2, out = write_qwen2_dir(args.model, args.out, args.source_dtype), args.out / "ortgenai"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for precision in ORTGENAI_ROWS:
        log(f"[baselines] onnxruntime-genai {precision}: model builder (cached) ...")
        # the builder's CPU defaults: MatMulNBits, block 32, symmetric, accuracy_level 4 (int8 activations)
        model_dir = cached(out / precision, lambda tmp, p=precision: run_logged(
            [args.ortgenai_python, "-m", "onnxruntime_genai.models.builder", "-i", qwen2, "-o", tmp, "-p", p,
             "-e", "cpu", "-c", out / "builder-cache"], out / f"builder-{p}.log", timed=False))
        log(f"[baselines] onnxruntime-genai {precision}: measuring ...")
        proc = run_logged([args.ortgenai_python, "-m", "benchmarks.baselines", "--ortgenai-worker", model_dir,
                           "--prompt-tokens", args.prompt_tokens, "--new-tokens", args.new_tokens,
                           "--repeat", args.repeat, "--threads", args.threads],
                          out / f"measure-{precision}.log", timed=True, cwd=REPO_ROOT)
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
        runs = measured["runs"]
        rows.append({"tool": "onnxruntime-genai", "precision": precision,
                     "version": f"onnxruntime-genai {measured['version']} (onnxruntime {measured['ort_version']})",
                     "weights_mib": size_mib(model_dir),
                     "prefill_ms": spread([r["prefill_ms"] for r in runs]),
                     "ttft_ms": spread([r["ttft_ms"] for r in runs]),
                     "decode_tok_s": spread([r["decode_tok_s"] for r in runs], 2),
                     "vision_error": "onnxruntime-genai has no InternVL vision path (its builder's architectures "
                                     "and runtime image processors do not include InternVL)"})
    return rows


def ortgenai_worker(model_dir: Path, prompt_tokens: int, new_tokens: int, repeat: int, threads: int) -> dict:
    """Runs inside the onnxruntime-genai venv. Prefill: append_tokens(prompt); TTFT: that plus the first
    generate_next_token (sampling from the prefill's logits); decode: new_tokens more, each one forward pass."""
    from importlib import metadata

    import onnxruntime_genai as og

    config_path = model_dir / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    config_path.write_text(json.dumps(config, indent=4))
    model = og.Model(str(model_dir))
    rng = random.Random(0)
    prompt = [rng.randrange(1000, config["model"]["vocab_size"]) for _ in range(prompt_tokens)]
    length = prompt_tokens + new_tokens + 1

    def once() -> dict:
        params = og.GeneratorParams(model)
        # min_length = max_length: random weights may pick EOS early, which would shorten the decode
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(prompt)
        prefilled = time.perf_counter()
        generator.generate_next_token()
        first = time.perf_counter()
        for _ in range(new_tokens):
            generator.generate_next_token()
        end = time.perf_counter()
        return {"prefill_ms": (prefilled - start) * 1e3, "ttft_ms": (first - start) * 1e3,
                "decode_tok_s": new_tokens / (end - first)}

    once()  # warm-up
    return {"version": metadata.version("onnxruntime-genai"), "ort_version": metadata.version("onnxruntime"),
            "runs": [once() for _ in range(repeat)]}


# ---- report ------------------------------------------------------------------------------------------------------

def _cell(figure: dict | None, fmt: str) -> str:
    if not figure:
        return "n/a"
    return f"{figure['median']:{fmt}} [{figure['min']:{fmt}}–{figure['max']:{fmt}}]"


def format_table(result: dict) -> str:
    n = result["config"]["prompt_tokens"]
    lines = [f"| tool | weights | file MiB | prompt {n} tok ms (prefill) | TTFT ms | decode tok/s after {n} | "
             "vision ms / tile | version |", "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['tool']} | {row['precision']} | {row['skipped'].splitlines()[0].split(';')[0]} "
                         "||||||")
            continue
        ttft = _cell(row["ttft_ms"], ".0f") + (" ¹" if row.get("ttft_derived") else "")
        vision = (_cell(row["vision_ms_per_tile"], ".0f") + f" ({row['mmproj']})" if "vision_ms_per_tile" in row
                  else "none ²" if row["tool"] == "onnxruntime-genai" else "failed: " + row["vision_error"][:60])
        lines.append(f"| {row['tool']} | {row['precision']} | {row['weights_mib']:.0f} | "
                     f"{_cell(row['prefill_ms'], '.0f')} | {ttft} | {_cell(row['decode_tok_s'], '.1f')} | "
                     f"{vision} | {row['version']}{'' if row.get('repack', True) else ' --repack 0'} |")
    c = result["config"]
    lines += ["", f"{c['threads']} threads; median [min–max] of {c['repeat']} runs after a warm-up; "
                  f"random token ids; malloc: {c.get('malloc', 'glibc defaults')}.",
              "¹ llama-bench has no TTFT: prefill of the prompt plus one decode step after it.",
              "² onnxruntime-genai has no InternVL vision path."]
    if result.get("machine", {}).get("isa_mask"):  # benchmarks/isa_mask.py
        lines.append(f"ONNX Runtime (onnxruntime-genai's too) under an ISA mask: {result['machine']['isa_mask']}; "
                     "llama.cpp runs the ISA it was built for.")
    return "\n".join(lines)


def _llama_types(text: str) -> tuple[str, ...]:
    types = tuple(t for t in text.split(",") if t)
    unknown = [t for t in types if t not in LLAMA_ROWS]
    if unknown or not types:
        raise argparse.ArgumentTypeError(f"{text!r}: expected some of {','.join(LLAMA_ROWS)}")
    return types


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baselines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", type=Path, help="a llama.cpp build directory (its bin/ has the tools)")
    parser.add_argument("--ortgenai-python", type=Path, help="a python with onnxruntime-genai and its builder")
    parser.add_argument("--model", type=Path, help="an InternVL2 checkpoint (either format, any decoder family)")
    parser.add_argument("--out", type=Path, default=Path("baselines-results"), help="conversions, logs, JSON")
    parser.add_argument("--source-dtype", choices=("float32", "float16"), default="float32",
                        help="dtype of the Qwen2 checkpoint both tools convert from; float16 halves its disk and "
                             "onnxruntime-genai's builder memory (InternVL2-4B on a 24 GiB machine); the quantized "
                             "rows are the same either way")
    parser.add_argument("--prompt-tokens", type=int, default=662)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-types", type=_llama_types, default=tuple(LLAMA_ROWS),
                        help=f"llama.cpp text weight types to measure, of {','.join(LLAMA_ROWS)} (default all)")
    parser.add_argument("--llama-no-repack", action="store_true",
                        help="llama.cpp without its repacked/AMX weight buffers (--repack 0): a native build on an "
                             "AMX CPU crashed in ggml_backend_amx_mul_mat on quantized weights")
    parser.add_argument("--default-malloc", action="store_true",
                        help="run the tools with glibc's default malloc, not with the huge pages edgevl's benchmark "
                             "gives its own workers (edgevl doctor)")
    parser.add_argument("--ortgenai-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ortgenai_worker:
        print(json.dumps(ortgenai_worker(args.ortgenai_worker, args.prompt_tokens, args.new_tokens, args.repeat,
                                         args.threads)))
        return 0
    if args.model is None or not (args.model / "config.json").exists():
        parser.error("--model: an InternVL2 checkpoint directory (with config.json) is required")
    args.model, args.out = args.model.resolve(), args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    from edgevl.doctor import malloc_setting, with_huge_page_malloc

    from . import machine

    if not args.default_malloc:  # every tool started from here on: the same malloc as edgevl's benchmark workers
        os.environ.update(with_huge_page_malloc(dict(os.environ)))

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    result = {"schema": "edgevl-baselines/1", "command": "python -m benchmarks.baselines " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "config": {"model": str(args.model), "source_dtype": args.source_dtype,
                         "prompt_tokens": args.prompt_tokens,
                         "new_tokens": args.new_tokens, "repeat": args.repeat, "threads": args.threads,
                         "malloc": malloc_setting(os.environ)},
              "machine": machine.describe(), "background": {"before": machine.background_activity(1.0)}}
    rows = []
    for tool_rows in (llama_rows, ortgenai_rows):
        try:
            rows += tool_rows(args, log)
        except RuntimeError as e:  # a failed conversion or run: say so, the other tool still runs
            log(f"[baselines] {tool_rows.__name__}: {e}")
            rows.append({"tool": tool_rows.__name__, "precision": "all", "skipped": str(e)})
    result["rows"] = rows
    result["background"]["after"] = machine.background_activity(1.0)
    with cpu_lock(exclusive=True):
        result["bandwidth"] = machine.memory_bandwidth(1024, threads=args.threads)
    table = format_table(result)
    (args.out / "baselines.json").write_text(json.dumps(result, indent=1))
    (args.out / "baselines.md").write_text(table + "\n")
    print(table)
    log(f"[baselines] {args.out / 'baselines.json'}, {args.out / 'baselines.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
