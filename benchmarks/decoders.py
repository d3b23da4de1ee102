"""An export's two decoder graphs against each other on this CPU (`python -m benchmarks decoders EXPORT`):
decoder.onnx on ONNX Runtime's ops and decoder_avx2.onnx on edgevl's (Int8MatMul / Int4MatMul, GroupQueryAttention),
the choice edgevl.cpu makes per machine class (EDGEVL_DECODERS_ON_VNNI, and the class without VNNI). Both sessions
live in one process and take turns, `alternations` times: a prefill of `positions` random token ids, then `steps`
greedy decode steps, each timed. On a shared VM the host's speed drifts within minutes, so only the pairs taken back
to back compare; the verdict counts the pairs each graph won. The greedy tokens of the two are compared as well: the
same arithmetic to float rounding (int8: the same integers, and attention's decode step summed in another order),
so a near-tie between two logits can flip and the tokens part after it.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from . import machine
from .report import machine_line

GRAPHS = {False: "decoder.onnx", True: "decoder_avx2.onnx"}  # OnnxRuntimeBackend(edgevl_ops=...)


def compare_decoders(export_dir: Path, positions: int, steps: int, alternations: int,
                     threads: int | None = None) -> dict:
    from edgevl import cpu
    from edgevl.backends.onnxruntime_backend import OnnxRuntimeBackend
    from edgevl.manifest import read_manifest

    if steps < 1 or alternations < 1:
        raise ValueError(f"steps={steps}, alternations={alternations}: expected at least 1 of each")
    manifest = read_manifest(export_dir)
    if not manifest.graphs.decoder_avx2:
        raise ValueError(f"{export_dir}: a {manifest.precision.decoder} export has no decoder_avx2.onnx to compare "
                         "(int8 and int4 exports carry one)")
    if positions + steps > manifest.limits.max_seq:  # before loading the model
        raise ValueError(f"positions + steps = {positions + steps}: more than the export's max_seq "
                         f"{manifest.limits.max_seq}")
    backends = {GRAPHS[ops]: OnnxRuntimeBackend(export_dir, manifest, num_threads=threads, edgevl_ops=ops)
                for ops in GRAPHS}
    ids = np.random.default_rng(0).integers(0, manifest.spec.decoder.vocab_size, positions)
    prompt = next(iter(backends.values())).embed_tokens(ids)

    def generate(backend) -> tuple[float, float, list[int]]:
        start = time.perf_counter()
        logits = backend.prefill(prompt)
        prefill_ms = (time.perf_counter() - start) * 1e3
        tokens = [int(np.argmax(logits))]
        start = time.perf_counter()
        for _ in range(steps):
            tokens.append(int(np.argmax(backend.decode(tokens[-1]))))
        return prefill_ms, (time.perf_counter() - start) * 1e3 / steps, tokens

    for backend in backends.values():  # warm-up: first-run allocations and page faults
        generate(backend)
    times = {graph: {"prefill_ms": [], "decode_ms": []} for graph in backends}
    tokens = {}
    for _ in range(alternations):
        for graph, backend in backends.items():
            prefill_ms, decode_ms, tokens[graph] = generate(backend)
            times[graph]["prefill_ms"].append(prefill_ms)
            times[graph]["decode_ms"].append(decode_ms)
    return {"export": str(export_dir), "precision": manifest.precision.decoder, "positions": positions,
            "steps": steps, "alternations": alternations, "threads": threads, "machine": machine.describe(),
            "default_graph": GRAPHS[manifest.precision.decoder in cpu.integer_gemm().edgevl_decoders], "graphs": times,
            "tokens": steps + 1, "same_leading_tokens": _common_prefix(tokens[GRAPHS[False]], tokens[GRAPHS[True]])}


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _spread(values: list[float], digits: int) -> str:
    return f"{statistics.median(values):,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def _versus(result: dict, key: str, verb: str) -> str:
    """'decodes 7.1% faster (faster in 8 of 8 pairs)' for decoder_avx2.onnx against decoder.onnx: the median of the
    pairs' ratios, each pair taken back to back."""
    ours, theirs = result["graphs"][GRAPHS[True]][key], result["graphs"][GRAPHS[False]][key]
    change = statistics.median(b / a for a, b in zip(ours, theirs)) - 1
    won = sum(a < b for a, b in zip(ours, theirs))
    return f"{verb} {abs(change):.1%} {'faster' if change >= 0 else 'slower'} (faster in {won} of {len(ours)} pairs)"


def format_decoders(result: dict) -> str:
    lines = [f"`{result['command']}`"] if "command" in result else []
    lines += [f"Decoder graphs of {result['export']} ({result['precision']}): {result['alternations']} alternations in "
             f"one process, {result['positions']} positions then {result['steps']} greedy steps each",
             f"machine: {machine_line(result['machine'])}",
             f"edgevl's default here: {result['default_graph']}", "",
             "| decoder graph | decode ms / step, median (min-max) | prefill ms, median (min-max) |", "|---|---:|---:|"]
    for ops, graph in GRAPHS.items():
        where = "edgevl's ops" if ops else "ONNX Runtime's ops"
        t = result["graphs"][graph]
        lines.append(f"| {graph} ({where}) | {_spread(t['decode_ms'], 2)} | {_spread(t['prefill_ms'], 0)} |")
    same, tokens = result["same_leading_tokens"], result["tokens"]
    agree = f"all {tokens} the same" if same == tokens else (
        f"the first {same} of {tokens} the same (the two sum in different orders, and float rounding flips a near-tie)")
    lines += ["", f"{GRAPHS[True]} {_versus(result, 'decode_ms', 'decodes')}, "
              f"{_versus(result, 'prefill_ms', 'prefills')}; greedy tokens: {agree}"]
    return "\n".join(lines)
