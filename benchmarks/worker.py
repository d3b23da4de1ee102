"""One backend, measured in its own process so that its peak RSS is its own:
`python -m benchmarks.worker CONFIG.json RESULT.json`.

Stages, each timed on its own with a warm-up first (the first call at a new shape allocates):
preprocessing of a 1920x1080 frame (CPU tiling), vision per tile count, then full generations (1 tile + a
prompt of N text tokens) for time to first token and decode tokens/s.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

from edgevl.cpu import process_memory_bytes

FRAME = (1920, 1080)
PROMPT_SENTENCE = ("Describe the scene in front of the vehicle, list every road user, the traffic lights and "
                   "signs, their distances and what each of them is likely to do next. ")


def stats(values) -> dict:
    values = [float(v) for v in values]
    return {"median": float(np.median(values)), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


WARMUP_CHEAP_S = 5.0  # calls longer than this get one warm-up: first-call allocation is then < 2% of a call


def _warm_up(fn) -> None:
    """Run fn until it is warm: oneDNN and ONNX Runtime build kernels / allocate on the first one or two calls at a
    new shape (measured: 0.9 s, 0.5 s, then 10 ms on the tiny model). A second call only when the first was cheap."""
    start = time.perf_counter()
    fn()
    if time.perf_counter() - start < WARMUP_CHEAP_S:
        fn()


def _timed(fn, repeat: int, warmup: bool = True) -> dict:
    if warmup:
        _warm_up(fn)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return stats(times)


def _vision_ms(encode, tiles, repeat: int) -> dict:
    """Per tile count. A count whose call is expected to take > WARMUP_CHEAP_S (from the previous count's
    per-tile time) gets no warm-up: its first-call allocation lands in one repeat, which the median discounts."""
    out, per_tile_ms = {}, 0.0
    for t in tiles:
        out[str(t)] = _timed(lambda: encode(t), repeat, warmup=per_tile_ms * t < WARMUP_CHEAP_S * 1e3)
        per_tile_ms = out[str(t)]["median"] / t
    return out


def rss_now_bytes() -> int | None:
    return process_memory_bytes("VmRSS")


def device_used_bytes() -> int | None:
    """GPU 0's memory in use (cudaMemGetInfo: total - free, every process's), or None without cuda-python. A
    sample, not a peak: the worker takes it after load and after the runs, when the runtimes' pools are grown."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return None
    err, free, total = cudart.cudaMemGetInfo()
    return int(total - free) if err == cudart.cudaError_t.cudaSuccess else None


def peak_rss_bytes() -> int:
    """This process's high-water RSS. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork and
    exec, so a worker would report its parent's peak when that is higher."""
    hwm = process_memory_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prompt_text(tokenizer, text_tokens: int) -> str:
    """A question of about `text_tokens` tokens (the first word count whose encoding reaches it)."""
    words = (PROMPT_SENTENCE * (1 + text_tokens // 8)).split()
    lo, hi = 1, len(words)
    while lo < hi:  # token count grows with the word count: bisect
        mid = (lo + hi) // 2
        if len(tokenizer.encode(" ".join(words[:mid]))) >= text_tokens:
            hi = mid
        else:
            lo = mid + 1
    return " ".join(words[:lo])


def tile_stack(tiling, tiles: int) -> np.ndarray:
    from edgevl.preprocess import preprocess_image
    from edgevl.synthetic import synthetic_image

    pixel_values = preprocess_image(synthetic_image(*FRAME, seed=1), tiling)
    return np.resize(pixel_values, (tiles,) + pixel_values.shape[1:])  # repeats tiles when more are asked for


def thread_info() -> dict:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {"threadpools": None, "threadpools_missing": "pip install threadpoolctl"}
    pools = [{k: p.get(k) for k in ("internal_api", "num_threads", "version", "architecture", "threading_layer",
                                    "filepath")} for p in threadpool_info()]
    info = {"threadpools": pools}
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch_threads"] = torch.get_num_threads()
        info["torch_interop_threads"] = torch.get_num_interop_threads()
    return info


# -- edgevl backends (torch, onnxruntime) -------------------------------------------------------------------

def run_edgevl(config: dict) -> dict:
    from edgevl import EdgeVL
    from edgevl.preprocess import preprocess_image
    from edgevl.synthetic import synthetic_image

    start = time.perf_counter()
    device = config.get("device", "cpu")
    model = EdgeVL.from_pretrained(config["model_dir"], backend=config["runtime"], device=device,
                                   dtype=config.get("dtype", "float32"), num_threads=config.get("threads") or None)
    result = {"load_s": time.perf_counter() - start, "rss_after_load_bytes": rss_now_bytes()}
    device_samples = [device_used_bytes()] if device != "cpu" else []
    repeat, frame = config["repeat"], synthetic_image(*FRAME, seed=1)
    result["preprocess_tiles"] = len(preprocess_image(frame, model.spec.tiling))
    result["preprocess_ms"] = _timed(lambda: preprocess_image(frame, model.spec.tiling), max(repeat, 5))
    stack = tile_stack(model.spec.tiling, max(config["tiles"]))
    result["vision_ms"] = _vision_ms(lambda t: model.backend.encode_images(stack[:t]), config["tiles"], repeat)
    question = prompt_text(model.tokenizer, config["prompt_tokens"])
    image = synthetic_image(448, 448, seed=2)  # exactly one tile (no thumbnail for a 1x1 grid)
    cold = model.generate(question, image, max_new_tokens=2)
    if cold.timings.time_to_first_token_ms < WARMUP_CHEAP_S * 1e3:
        model.generate(question, image, max_new_tokens=2)
    runs = [model.generate(question, image, max_new_tokens=config["new_tokens"]) for _ in range(repeat)]
    result.update(_generation_figures(runs, cold, model.tokenizer, question))
    if config.get("contexts"):
        # The prompt around the question (template, image tokens) is what runs[0] had beyond its text tokens.
        around = runs[0].prompt_tokens - result["prompt_text_tokens"]
        result["context_curve"] = [_context_point(model, image, c, around, config["new_tokens"], repeat)
                                   for c in config["contexts"]]
    if device_samples:  # after load, then after the largest vision batch and the generations have run
        device_samples.append(device_used_bytes())
        result["peak_device_bytes"] = max(device_samples, key=lambda v: v or 0)
    if config["runtime"] == "onnxruntime":
        result["decoder_graph"] = model.backend.decoder_graph  # decoder_avx2.onnx: edgevl's own matmul ops
        result["vision_graph"] = model.backend.vision_graph  # vision_amx.onnx: attention bf16 on AMX tiles
        options = model.backend.decoder.get_session_options()
        result["threads"] = {"onnxruntime_intra_op": options.intra_op_num_threads,
                             "onnxruntime_inter_op": options.inter_op_num_threads,
                             "onnxruntime_providers": model.backend.decoder.get_providers()}
    return result


def _context_point(model, image, positions: int, around: int, new_tokens: int, repeat: int) -> dict:
    """One point of the context curve: generations of `new_tokens` whose last token sits at about `positions`
    (1 tile + text), from a fresh cache each time. RSS is this process's after them: the shared KV layout holds
    max_seq positions from the start, the concat one grows with the context."""
    text_tokens = positions - new_tokens - around
    if text_tokens < 1 or positions > model.backend.max_seq:
        return {"positions": positions, "reason": f"out of range {around + new_tokens + 1}..{model.backend.max_seq} "
                                                  f"(the image, template and answer take {around + new_tokens})"}
    question = prompt_text(model.tokenizer, text_tokens)
    runs = [model.generate(question, image, max_new_tokens=new_tokens) for _ in range(repeat)]
    return {"positions": runs[0].prompt_tokens + len(runs[0].token_ids), "prompt_tokens": runs[0].prompt_tokens,
            "ttft_ms": stats(r.timings.time_to_first_token_ms for r in runs),
            "prefill_ms": stats(r.timings.prefill_ms for r in runs),
            "decode_tokens_per_s": stats(r.timings.decode_tokens_per_s for r in runs),
            "rss_bytes": rss_now_bytes()}


def _generation_figures(runs, cold, tokenizer, question) -> dict:
    return {
        "prompt_text_tokens": len(tokenizer.encode(question)),
        "prompt_tokens": runs[0].prompt_tokens,
        "tiles_for_ttft": runs[0].tiles_per_image,
        "cold_ttft_ms": cold.timings.time_to_first_token_ms,
        "ttft_ms": stats(r.timings.time_to_first_token_ms for r in runs),
        "ttft_parts_ms": {"preprocess": stats(r.timings.preprocess_ms for r in runs),
                          "vision": stats(r.timings.vision_ms for r in runs),
                          "prefill": stats(r.timings.prefill_ms for r in runs)},
        "decode_tokens_per_s": stats(r.timings.decode_tokens_per_s for r in runs),
        "new_tokens": [len(r.token_ids) for r in runs],
        "stop_reasons": [r.stop_reason for r in runs],
    }


# -- transformers eager --------------------------------------------------------------------------------------

class _TokenClock:
    """A generate() streamer that timestamps each new token (the first put() is the prompt)."""

    def __init__(self):
        self.times, self._prompt_seen = [], False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def run_transformers(config: dict) -> dict:
    import torch
    import transformers

    from edgevl.preprocess import preprocess_image
    from edgevl.prompts import build_query, checkpoint_system_message, get_template, render_prompt, tokenize_prompt
    from edgevl.specs import read_config, spec_from_config
    from edgevl.synthetic import synthetic_image
    from edgevl.tokenizer import load_tokenizer

    model_dir = Path(config["model_dir"])
    start = time.perf_counter()
    model = transformers.InternVLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    result = {"load_s": time.perf_counter() - start, "rss_after_load_bytes": rss_now_bytes(),
              "attn_implementation": model.config._attn_implementation}
    spec, tokenizer = spec_from_config(read_config(model_dir), model_dir), load_tokenizer(model_dir)
    repeat, frame = config["repeat"], synthetic_image(*FRAME, seed=1)
    # Same CPU tiling code as the edgevl rows (transformers' GotOcr2 processor is not what is compared here).
    result["preprocess_tiles"] = len(preprocess_image(frame, spec.tiling))
    result["preprocess_ms"] = _timed(lambda: preprocess_image(frame, spec.tiling), max(repeat, 5))
    stack = torch.from_numpy(tile_stack(spec.tiling, max(config["tiles"])))
    with torch.inference_mode():
        encode = lambda t: model.model.get_image_features(pixel_values=stack[:t])  # noqa: E731
        result["vision_ms"] = _vision_ms(encode, config["tiles"], repeat)
    template = get_template(spec.template)
    question = prompt_text(tokenizer, config["prompt_tokens"])
    image = synthetic_image(448, 448, seed=2)
    stop_ids = [tokenizer.token_to_id(template.stop_token)]
    system_message = checkpoint_system_message(model_dir, spec.template)  # as EdgeVL does

    def generate(new_tokens: int) -> dict:
        clock = _TokenClock()
        start = time.perf_counter()
        pixel_values = torch.from_numpy(preprocess_image(image, spec.tiling))
        text = render_prompt(template, build_query(question, 1), (), system_message)
        ids = torch.from_numpy(tokenize_prompt(tokenizer, text, [len(pixel_values)]))[None]
        with torch.inference_mode():
            out = model.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, eos_token_id=stop_ids,
                                 pad_token_id=stop_ids[0], streamer=clock)
        n = out.shape[1] - ids.shape[1]
        decode_s = clock.times[-1] - clock.times[0]
        return {"ttft_ms": (clock.times[0] - start) * 1e3, "new_tokens": n, "prompt_tokens": ids.shape[1],
                "decode_tokens_per_s": (len(clock.times) - 1) / decode_s if decode_s > 0 else 0.0}

    cold = generate(2)
    if cold["ttft_ms"] < WARMUP_CHEAP_S * 1e3:
        generate(2)
    runs = [generate(config["new_tokens"]) for _ in range(repeat)]
    result.update({
        "prompt_text_tokens": len(tokenizer.encode(question)), "prompt_tokens": runs[0]["prompt_tokens"],
        "tiles_for_ttft": [1], "cold_ttft_ms": cold["ttft_ms"], "ttft_ms": stats(r["ttft_ms"] for r in runs),
        "decode_tokens_per_s": stats(r["decode_tokens_per_s"] for r in runs),
        "new_tokens": [r["new_tokens"] for r in runs], "stop_reasons": ["min_new_tokens"] * len(runs)})
    return result


def main(argv=None) -> int:
    config_path, result_path = (argv or sys.argv[1:])[:2]
    config = json.loads(Path(config_path).read_text())
    run = run_transformers if config["runtime"] == "transformers" else run_edgevl
    result = run(config)
    result["threads"] = {**thread_info(), **result.get("threads", {})}
    result["peak_rss_bytes"] = peak_rss_bytes()
    Path(result_path).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
