"""python -m benchmarks run | versus | plan | profile | decoders | gemv | compare (also `--compare a.json b.json`).
See benchmarks/README.md."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

from .models import BACKENDS, DEFAULT_CACHE

CPU_BACKENDS = "transformers,torch,ort-fp32,ort-int8,ort-int4"
QUICK = {"tiles": "1,2", "prompt_tokens": 32, "new_tokens": 8, "repeat": 2}


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,7,13") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers")
    return values


def _parser() -> argparse.ArgumentParser:
    from edgevl.specs import KNOWN_SPECS

    from . import decoders as decoders_module, gemv as gemv_module, versus as versus_module
    from .plan import DEVICES, PRECISIONS

    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="measure backends side by side: table, JSON, plots")
    src = run.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="an InternVL checkpoint directory")
    src.add_argument("--shape", choices=sorted(KNOWN_SPECS), help="random weights with this model's real shapes")
    run.add_argument("--backends", default=None, help=f"comma-separated, of {','.join(BACKENDS)} "
                                                      f"(default {CPU_BACKENDS})")
    run.add_argument("--tiles", type=_ints, default=None, help="tile counts for vision latency (default 1,7,13)")
    run.add_argument("--prompt-tokens", type=int, default=None, help="text tokens in the TTFT prompt (default 300)")
    run.add_argument("--new-tokens", type=int, default=None, help="tokens decoded per generation (default 128)")
    run.add_argument("--repeat", type=int, default=None, help="measured repeats per figure (default 3)")
    run.add_argument("--contexts", type=_ints, default=(),
                     help="also the cost of context: TTFT, decode tokens/s and RSS of a generation whose last token "
                          "sits at each of these positions, e.g. 512,2048,4096 (1 tile + text; edgevl rows)")
    run.add_argument("--threads", type=int, default=None, help="intra-op threads for ONNX Runtime (default: cores)")
    run.add_argument("--out", type=Path, default=Path("bench-results"), help="where JSON, table and plots go")
    run.add_argument("--cache", type=Path, default=None, help=f"checkpoints and exports (default {DEFAULT_CACHE})")
    run.add_argument("--quick", action="store_true", help="tiny random model, seconds: the smoke test")
    run.add_argument("--default-malloc", action="store_true",
                     help="start the workers with glibc's default malloc, not with huge pages (edgevl doctor)")
    run.add_argument("--no-plots", action="store_true")
    versus = sub.add_parser(
        "versus", help="edgevl against llama.cpp and onnxruntime-genai in interleaved rounds: per-round ratios",
        description=versus_module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = versus.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="an InternVL2 checkpoint directory")
    src.add_argument("--shape", choices=sorted(KNOWN_SPECS), default="internvl2-1b",
                     help="random weights with this model's real shapes (default internvl2-1b)")
    versus.add_argument("--llama-cpp", type=Path, help="a llama.cpp build directory (benchmarks/README.md)")
    versus.add_argument("--ortgenai-python", type=Path, help="a python with onnxruntime-genai and its builder")
    versus.add_argument("--precisions", type=_subset(versus_module.PAIRS), default=("int8", "int4"),
                        help="default int8,int4")
    versus.add_argument("--rounds", type=int, default=3, help="rounds, alternating which runs first (default 3)")
    versus.add_argument("--prompt-tokens", type=int, default=300,
                        help="text tokens of edgevl's prompt, after its 1-tile image (default 300)")
    versus.add_argument("--new-tokens", type=int, default=64, help="tokens decoded (default 64)")
    versus.add_argument("--repeat", type=int, default=2, help="measured repeats per figure in each round (default 2)")
    versus.add_argument("--threads", type=int, default=None,
                        help="threads for every runtime (default: the physical cores)")
    versus.add_argument("--lead", type=float, default=1.2, help="the decode ratio to meet (default 1.2)")
    versus.add_argument("--out", type=Path, default=Path("versus-results"),
                        help="rounds, the baselines' conversions, versus.json and versus.md")
    versus.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"checkpoints and exports "
                                                                          f"(default {DEFAULT_CACHE})")
    versus.add_argument("--from-rounds", action="store_true",
                        help="run nothing: summarize the rounds already under --out")
    plan = sub.add_parser("plan", help="weights + KV cache + activations against a device's memory")
    plan.add_argument("--shape", choices=sorted(KNOWN_SPECS), default=None)
    plan.add_argument("--model", type=Path, default=None, help="a checkpoint directory (its config.json)")
    plan.add_argument("--device", default="orin-nano-8gb", help=f"one of {', '.join(DEVICES)}, or cpu")
    plan.add_argument("--ram-gb", type=float, default=None, help="--device cpu: RAM in GB (default: this machine)")
    plan.add_argument("--precision", choices=PRECISIONS, default="int8")
    plan.add_argument("--max-seq", type=int, default=4096)
    plan.add_argument("--tiles", type=int, default=13, help="tiles of the largest image (13 = 12 + thumbnail)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    profile = sub.add_parser("profile", help="where a decode step's time goes: ONNX Runtime's profiler per op type")
    profile.add_argument("export", type=Path, help="an `edgevl export` directory")
    profile.add_argument("--positions", type=int, default=662, help="prompt positions before decoding (default 662)")
    profile.add_argument("--steps", type=int, default=40, help="tokens decoded (default 40; the first 2 not counted)")
    profile.add_argument("--threads", type=int, default=None, help="intra-op threads (default: cores)")
    profile.add_argument("--json", action="store_true", help="print the profile as JSON")
    decoders = sub.add_parser("decoders", help="an export's decoder.onnx against its decoder_avx2.onnx (edgevl's "
                              "matmul ops), alternating in one process", description=decoders_module.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    decoders.add_argument("export", type=Path, help="an int8 or int4 `edgevl export` directory")
    decoders.add_argument("--positions", type=int, default=662, help="prompt positions (default 662)")
    decoders.add_argument("--steps", type=int, default=40, help="greedy decode steps per turn (default 40)")
    decoders.add_argument("--alternations", type=int, default=8, help="turns each graph takes (default 8)")
    decoders.add_argument("--threads", type=int, default=None, help="intra-op threads (default: cores)")
    decoders.add_argument("--json", action="store_true", help="print the result as JSON")
    gemv = sub.add_parser("gemv", help="the int8 (and int4) weight matmul in each formulation: exact here? how fast?",
                          description=gemv_module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gemv.add_argument("--shape", choices=sorted(KNOWN_SPECS), default="internvl2-1b",
                      help="the model shape whose MLP matrices are timed (default internvl2-1b)")
    gemv.add_argument("--layers", type=int, default=None, help="that many layers' matrices (default: all)")
    gemv.add_argument("--rows", type=int, default=1, help="activation rows (default 1: a decode step)")
    gemv.add_argument("--repeat", type=int, default=20, help="timed passes (default 20)")
    gemv.add_argument("--threads", type=int, default=None, help="intra-op threads (default: cores)")
    gemv.add_argument("--formulations", type=_subset(gemv_module.FORMULATIONS), default=None,
                      help="comma-separated (default: all this machine runs)")
    gemv.add_argument("--json", action="store_true", help="print the result as JSON")
    compare = sub.add_parser("compare", help="the change between two result JSONs")
    compare.add_argument("a", type=Path)
    compare.add_argument("b", type=Path)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--compare"]:
        argv[0] = "compare"
    args = _parser().parse_args(argv)
    return {"run": _run, "versus": _versus, "plan": _plan, "profile": _profile, "decoders": _decoders,
            "gemv": _gemv, "compare": _compare}[args.command](args, argv)


def _run(args, argv) -> int:
    from .models import model_source, shaped_source, tiny_source
    from .report import format_table
    from .run import RunConfig, run_benchmarks, write_outputs

    defaults = QUICK if args.quick else {"tiles": "1,7,13", "prompt_tokens": 300, "new_tokens": 128, "repeat": 3}
    config = RunConfig(
        backends=tuple((args.backends or CPU_BACKENDS).split(",")),
        tiles=args.tiles or _ints(defaults["tiles"]),
        prompt_tokens=args.prompt_tokens or defaults["prompt_tokens"],
        new_tokens=args.new_tokens or defaults["new_tokens"], repeat=args.repeat or defaults["repeat"],
        contexts=args.contexts,
        threads=args.threads, bandwidth_mib=64 if args.quick else 2048, quick=args.quick,
        huge_page_malloc=not args.default_malloc)
    if args.quick and (args.model or args.shape):
        print("--quick runs the tiny random model; drop --model/--shape", file=sys.stderr)
        return 2
    cache = args.cache or (Path(tempfile.mkdtemp(prefix="edgevl-bench-quick-")) if args.quick else DEFAULT_CACHE)
    if args.quick:
        source = tiny_source(cache)
    elif args.model:
        source = model_source(args.model, cache)
    else:
        source = shaped_source(args.shape or "internvl2-1b", cache)
    command = "python -m benchmarks " + shlex.join(argv)
    try:
        result = run_benchmarks(source, config, args.out, command=command)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = write_outputs(result, args.out, source.name, plots=not args.no_plots)
    print()
    print(format_table(result))
    print()
    for kind, path in paths.items():
        print(f"[bench] {kind}: {path}")
    return 0


def _subset(allowed):
    """An argparse type: a comma-separated, non-empty subset of `allowed`."""
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(t for t in text.split(",") if t)
        if not values or any(v not in allowed for v in values):
            raise argparse.ArgumentTypeError(f"{text!r}: expected some of {','.join(allowed)}")
        return values

    return parse


def _versus(args, argv) -> int:
    from .machine import physical_cores
    from .report import run_header
    from .versus import format_summary, load_rounds, run_rounds, summarize

    out, args.threads = args.out.absolute(), args.threads or physical_cores()
    for name in ("model", "cache", "llama_cpp", "ortgenai_python"):  # the rounds run from the repository root
        if getattr(args, name) is not None:  # absolute(), not resolve(): a venv's python is a link to keep
            setattr(args, name, getattr(args, name).absolute())
    try:
        rounds = load_rounds(out) if args.from_rounds else run_rounds(args, out)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = summarize(rounds, args.precisions, args.lead)
    command = "python -m benchmarks " + shlex.join(argv)
    summary["command"] = _rounds_command(out) if args.from_rounds else command
    lines = [f"- command: `{summary['command']}`"]
    if summary["command"] != command:  # summarized again: the command that ran the rounds stays the record
        summary["summarized_by"] = command
        lines.append(f"- summarized again by: `{command}`")
    table = format_summary(summary)
    (out / "versus.json").write_text(json.dumps(summary, indent=1))
    (out / "versus.md").write_text("\n".join(lines) + "\n- the first round's edgevl run:\n\n"
                                   f"{run_header(rounds[0]['edgevl'])}\n\n{table}\n")
    print(table)
    print(f"[versus] {out / 'versus.json'}, {out / 'versus.md'}")
    return 0


def _rounds_command(out: Path) -> str:
    """The command that ran the rounds under `out`, from the versus.json it wrote ("unknown" without one)."""
    try:
        return json.loads((out / "versus.json").read_text())["command"]
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown: no versus.json from the run of these rounds"


def _plan(args, argv) -> int:
    from edgevl.specs import KNOWN_SPECS, read_config, spec_from_config

    from .machine import describe
    from .plan import DEVICES, cpu_device, format_plan, plan

    if args.model:
        spec = spec_from_config(read_config(args.model), args.model)
    else:
        spec = KNOWN_SPECS[args.shape or "internvl2-1b"]
    if args.device == "cpu":
        device = cpu_device(int(args.ram_gb * (1 << 30)) if args.ram_gb else describe()["ram_bytes"])
    elif args.device in DEVICES:
        device = DEVICES[args.device]
    else:
        print(f"error: --device {args.device!r}: expected one of {', '.join(DEVICES)}, cpu", file=sys.stderr)
        return 2
    result = plan(spec, device, args.precision, args.max_seq, args.tiles)
    print(json.dumps(result, indent=1) if args.json else format_plan(result))
    return 0


def _profile(args, argv) -> int:
    from .profile import decode_profile, format_profile

    try:
        result = decode_profile(args.export, args.positions, args.steps, args.threads)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else format_profile(result))
    return 0


def _decoders(args, argv) -> int:
    from .decoders import compare_decoders, format_decoders

    try:
        result = compare_decoders(args.export, args.positions, args.steps, args.alternations, args.threads)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["command"] = shlex.join(["python", "-m", "benchmarks", *argv])
    print(json.dumps(result, indent=1) if args.json else format_decoders(result))
    return 0


def _gemv(args, argv) -> int:
    from .gemv import format_gemv, measure

    result = measure(args.shape, args.rows, args.repeat, args.threads, args.layers, args.formulations,
                     log=lambda line: print(line, file=sys.stderr))
    print(json.dumps(result, indent=1) if args.json else format_gemv(result))
    return 0


def _compare(args, argv) -> int:
    from .report import compare

    print(compare(json.loads(args.a.read_text()), json.loads(args.b.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
