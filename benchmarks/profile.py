"""Where one decode step's time goes: ONNX Runtime's profiler over an export's decoder (`python -m benchmarks
profile EXPORT`). A prompt of random token ids is prefilled, then `steps` tokens are decoded greedily; the report is
per decoded token, over the steps after the first WARMUP_STEPS: the time of each op type's nodes, all nodes, and
the whole run (`model_run`: nodes plus ONNX Runtime's own work between them). The profiler slows every node a
little, so read the shares, not the absolute times (`python -m benchmarks run` measures those).
"""
from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

WARMUP_STEPS = 2


def decode_profile(export_dir: Path, positions: int, steps: int, threads: int | None = None) -> dict:
    from edgevl.backends.onnxruntime_backend import OnnxRuntimeBackend
    from edgevl.manifest import read_manifest

    if steps <= WARMUP_STEPS:
        raise ValueError(f"steps={steps}: expected more than the {WARMUP_STEPS} warm-up steps")
    manifest = read_manifest(export_dir)
    if positions + steps > manifest.limits.max_seq:  # before loading the model
        raise ValueError(f"positions + steps = {positions + steps}: more than the export's max_seq "
                         f"{manifest.limits.max_seq}")
    with tempfile.TemporaryDirectory(prefix="edgevl-profile-") as tmp:
        backend = OnnxRuntimeBackend(export_dir, manifest, num_threads=threads,
                                     profile_prefix=str(Path(tmp) / "decoder"))
        vocab = manifest.spec.decoder.vocab_size
        logits = backend.prefill(backend.embed_tokens(np.random.default_rng(0).integers(0, vocab, positions)))
        for _ in range(steps):
            logits = backend.decode(int(np.argmax(logits)))
        events = json.loads(Path(backend.decoder.end_profiling()).read_text())
        graph = backend.decoder_graph  # decoder_avx2.onnx on x86 without VNNI: edgevl's matmul ops
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    measured = runs[len(runs) - steps + WARMUP_STEPS:]  # the prefill's runs come first
    start, end = measured[0]["ts"], measured[-1]["ts"] + measured[-1]["dur"]
    per_op: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and start <= event["ts"] <= end:
            per_op[event["args"]["op_name"]] += event["dur"]
    ms = lambda us: us / len(measured) / 1e3  # noqa: E731  (the profiler's times are microseconds)
    return {"export": str(export_dir), "precision": manifest.precision.decoder, "graph": graph, "positions": positions,
            "tokens": len(measured), "model_run_ms": ms(sum(r["dur"] for r in measured)),
            "nodes_ms": ms(sum(per_op.values())),
            "ops_ms": {op: ms(us) for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])}}


def format_profile(profile: dict) -> str:
    lines = [f"Decode profile: {profile['export']} ({profile['precision']} decoder, {profile['graph']}), "
             f"{profile['tokens']} tokens after {profile['positions']} positions; ms per token under ONNX Runtime's "
             "profiler", "",
             "| op type | ms | share of model_run |", "|---|---:|---:|"]
    run = profile["model_run_ms"]
    for op, ms in profile["ops_ms"].items():
        lines.append(f"| {op} | {ms:.2f} | {ms / run:.1%} |")
    lines += [f"| all nodes | {profile['nodes_ms']:.2f} | {profile['nodes_ms'] / run:.1%} |",
              f"| model_run (nodes + between them) | {run:.2f} | 100% |"]
    return "\n".join(lines)
