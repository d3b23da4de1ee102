"""edgevl against llama.cpp and onnxruntime-genai in interleaved rounds: `python -m benchmarks versus`.

On a shared VM the same figure can move by a third within an hour, so figures from separate runs do not compare.
Each round here runs `python -m benchmarks run` (edgevl's ort-int8 / ort-int4 rows) and `python -m benchmarks.baselines`
(llama.cpp Q8_0 / Q4_0, onnxruntime-genai int8 / int4) back to back, alternating which goes first (E B, B E, E B, ...);
every ratio is taken within its round, and the verdict is on the median of the rounds' ratios.

Ratios are edgevl's speed over the peer's (above 1: edgevl faster), at the same precision:
- decode: tokens/s after the prompt (edgevl: 1 tile + --prompt-tokens of text, 662 positions at the 1B shape;
  llama-bench and onnxruntime-genai: that many random tokens);
- vision: ms per 448x448 tile against llama.cpp's mmproj (onnxruntime-genai has no InternVL vision path);
- TTFT: edgevl's, from the call with the image, against llama.cpp's time to its first token plus its vision of one
  tile (onnxruntime-genai cannot take the image);
- prefill: the prompt's positions into the KV cache, edgevl's part of its TTFT against each peer's prompt of as many
  tokens.
The verdict asks for --lead on decode (default 1.2x) and for being ahead (1.0x) on the others.
"""
from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# precision -> (edgevl backend, llama.cpp text type, onnxruntime-genai precision)
PAIRS = {"int8": ("ort-int8", "Q8_0", "int8"), "int4": ("ort-int4", "Q4_0", "int4")}
LLAMA, ORTGENAI = "llama.cpp", "onnxruntime-genai"
# ratio name -> (figure, peer); the order of the table's columns
RATIOS = {"decode vs llama.cpp": ("decode", LLAMA), "decode vs onnxruntime-genai": ("decode", ORTGENAI),
          "vision vs llama.cpp": ("vision", LLAMA), "TTFT vs llama.cpp": ("ttft", LLAMA),
          "prefill vs llama.cpp": ("prefill", LLAMA), "prefill vs onnxruntime-genai": ("prefill", ORTGENAI)}
REPO_ROOT = Path(__file__).resolve().parents[1]


def round_order(index: int) -> tuple[str, str]:
    """Round 0 runs edgevl first, round 1 the baselines first, and so on: a drift within a round favours neither."""
    return ("edgevl", "baselines") if index % 2 == 0 else ("baselines", "edgevl")


def _median(stat: dict | None) -> float | None:
    return None if not stat else stat["median"]


def figures(edgevl: dict, baselines: dict, precision: str) -> dict[str, dict]:
    """One round's figures at one precision: {runtime: {"decode": tok/s, "vision": ms/tile, "ttft": ms,
    "prefill": ms}}, None where a row is missing or skipped. llama.cpp's TTFT adds its vision of one tile."""
    backend, llama_type, ortgenai_precision = PAIRS[precision]
    e = next((r for r in edgevl["rows"] if r["backend"] == backend and r.get("available")), {})
    peers = {(r["tool"], r["precision"]): r for r in baselines["rows"] if "skipped" not in r}
    llama, ortgenai = peers.get((LLAMA, llama_type), {}), peers.get((ORTGENAI, ortgenai_precision), {})
    llama_ttft, llama_vision = _median(llama.get("ttft_ms")), _median(llama.get("vision_ms_per_tile"))
    return {
        "edgevl": {"decode": _median(e.get("decode_tokens_per_s")), "vision": _median(e.get("vision_ms", {}).get("1")),
                   "ttft": _median(e.get("ttft_ms")), "prefill": _median(e.get("ttft_parts_ms", {}).get("prefill"))},
        LLAMA: {"decode": _median(llama.get("decode_tok_s")), "vision": llama_vision,
                "ttft": None if llama_ttft is None or llama_vision is None else llama_ttft + llama_vision,
                "prefill": _median(llama.get("prefill_ms"))},
        ORTGENAI: {"decode": _median(ortgenai.get("decode_tok_s")), "vision": None, "ttft": None,
                   "prefill": _median(ortgenai.get("prefill_ms"))},
    }


def ratios(fig: dict[str, dict]) -> dict[str, float | None]:
    """edgevl's speed over each peer's: tokens/s divided, times (ms) inverted."""
    out = {}
    for name, (figure, peer) in RATIOS.items():
        mine, theirs = fig["edgevl"][figure], fig[peer][figure]
        if mine is None or theirs is None:
            out[name] = None
        else:
            out[name] = mine / theirs if figure == "decode" else theirs / mine
    return out


def summarize(rounds: list[dict], precisions, lead: float) -> dict:
    """rounds: [{"order": [...], "edgevl": run JSON, "baselines": baselines JSON}] -> every round's figures and
    ratios, the median ratio over the rounds and whether it meets the bar (None where a peer never ran)."""
    out = {"lead": lead, "precisions": {}}
    for precision in precisions:
        per_round = []
        for r in rounds:
            fig = figures(r["edgevl"], r["baselines"], precision)
            per_round.append({"order": r["order"], "figures": fig, "ratios": ratios(fig)})
        medians, verdict = {}, {}
        for name, (figure, _) in RATIOS.items():
            values = [r["ratios"][name] for r in per_round if r["ratios"][name] is not None]
            medians[name] = statistics.median(values) if values else None
            bar = lead if figure == "decode" else 1.0
            verdict[name] = None if medians[name] is None else medians[name] >= bar
        out["precisions"][precision] = {"rounds": per_round, "median": medians, "meets": verdict}
    return out


def format_summary(summary: dict) -> str:
    def num(v, fmt):
        return "—" if v is None else format(v, fmt)

    lines = ["| precision | round (order) | decode tok/s edgevl / llama.cpp / onnxruntime-genai | vision ms edgevl / "
             "llama.cpp | TTFT ms edgevl / llama.cpp (+ vision) | prefill ms edgevl / llama.cpp / onnxruntime-genai | "
             + " | ".join(RATIOS) + " |",
             "|---|---|---|---|---|---|" + "---:|" * len(RATIOS)]
    for precision, p in summary["precisions"].items():
        for i, r in enumerate(p["rounds"], 1):
            f = r["figures"]
            lines.append(
                f"| {precision} | {i} ({' then '.join(r['order'])}) "
                f"| {' / '.join(num(f[k]['decode'], '.1f') for k in ('edgevl', LLAMA, ORTGENAI))} "
                f"| {' / '.join(num(f[k]['vision'], ',.0f') for k in ('edgevl', LLAMA))} "
                f"| {' / '.join(num(f[k]['ttft'], ',.0f') for k in ('edgevl', LLAMA))} "
                f"| {' / '.join(num(f[k]['prefill'], ',.0f') for k in ('edgevl', LLAMA, ORTGENAI))} | "
                + " | ".join(num(r["ratios"][n], ".2f") + ("x" if r["ratios"][n] is not None else "") for n in RATIOS)
                + " |")
        marks = {True: " (meets)", False: " (short)", None: ""}
        lines.append(f"| {precision} | median of rounds | | | | | " + " | ".join(
            num(p["median"][n], ".2f") + ("x" if p["median"][n] is not None else "") + marks[p["meets"][n]]
            for n in RATIOS) + " |")
    lines.append(f"\nAbove 1: edgevl faster. Meets: decode >= {summary['lead']}x, the others >= 1.0x.")
    return "\n".join(lines)


def _step(kind: str, command: list[str], log_path: Path, log) -> None:
    log(f"[versus] {kind}: {' '.join(command)} (log {log_path})")
    start = time.perf_counter()
    with open(log_path, "w") as f:
        proc = subprocess.run(command, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"{kind} exited {proc.returncode}; see {log_path}")
    log(f"[versus] {kind}: done in {time.perf_counter() - start:.0f} s")


def run_rounds(args, out: Path, log=print, step=_step) -> list[dict]:
    """Run args.rounds rounds into out/round-N/ (edgevl's report, baselines.json, both logs); the baselines'
    conversions are made once, under out/baselines/, and prompt as many tokens as edgevl's first run had positions
    (its image's tokens, the question and the template's). `step` runs one command (a test replaces it)."""
    from .models import shaped_source

    checkpoint = args.model or shaped_source(args.shape, args.cache).original
    source = ["--model", str(args.model)] if args.model else ["--shape", args.shape]
    common = ["--new-tokens", str(args.new_tokens), "--repeat", str(args.repeat), "--threads", str(args.threads)]
    conversions, positions, rounds = out / "baselines", None, []
    for index in range(args.rounds):
        round_dir = out / f"round-{index + 1}"
        round_dir.mkdir(parents=True, exist_ok=True)
        order = round_order(index)
        for kind in order:
            if kind == "edgevl":
                command = [sys.executable, "-m", "benchmarks", "run", *source, "--cache", str(args.cache),
                           "--backends", ",".join(PAIRS[p][0] for p in args.precisions), "--tiles", "1",
                           "--prompt-tokens", str(args.prompt_tokens), *common, "--no-plots",
                           "--out", str(round_dir / "edgevl")]
            else:
                command = [sys.executable, "-m", "benchmarks.baselines", "--model", str(checkpoint),
                           "--out", str(conversions), "--llama-types", ",".join(PAIRS[p][1] for p in args.precisions),
                           "--prompt-tokens", str(positions), *common]
                command += ["--llama-cpp", str(args.llama_cpp)] if args.llama_cpp else []
                command += ["--ortgenai-python", str(args.ortgenai_python)] if args.ortgenai_python else []
            step(f"round {index + 1}/{args.rounds} {kind}", command, round_dir / f"{kind}.log", log)
            if kind == "edgevl" and positions is None:  # round 1 runs edgevl first
                measured = [r["prompt_tokens"] for r in _edgevl_report(round_dir)["rows"] if r.get("available")]
                if not measured:
                    raise RuntimeError(f"edgevl measured none of its rows; see {round_dir / 'edgevl.log'}")
                positions = max(measured)
        shutil.copy(conversions / "baselines.json", round_dir / "baselines.json")
        (round_dir / "order.json").write_text(json.dumps(order))
        rounds.append(load_round(round_dir))
    return rounds


def _edgevl_report(round_dir: Path) -> dict:
    reports = sorted((round_dir / "edgevl").glob("*.json"))
    if len(reports) != 1:
        raise ValueError(f"{round_dir / 'edgevl'}: expected one `benchmarks run` JSON, found {len(reports)}")
    return json.loads(reports[0].read_text())


def load_round(round_dir: Path) -> dict:
    return {"order": json.loads((round_dir / "order.json").read_text()), "edgevl": _edgevl_report(round_dir),
            "baselines": json.loads((round_dir / "baselines.json").read_text())}


def load_rounds(out: Path) -> list[dict]:
    dirs = sorted(out.glob("round-*"), key=lambda d: int(d.name.split("-")[1]))
    if not dirs:
        raise ValueError(f"{out}: no round-N directories (written by `python -m benchmarks versus --out {out}`)")
    return [load_round(d) for d in dirs]
