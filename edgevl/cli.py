"""`edgevl` command line: a thin shell over the Python API (each command calls one public function)."""
from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .backends import BACKENDS
from .precisions import BUILD_PRECISIONS, EXPORT_PRECISIONS, precision_help


def _add_generation_args(p: argparse.ArgumentParser, default_prompt: str | None = None,
                         default_max_new_tokens: int = 128) -> None:
    p.add_argument("--prompt", required=default_prompt is None, default=default_prompt,
                   help="the question; '<image>' marks where each image goes (added in front when absent)")
    p.add_argument("--image", action="append", default=[], metavar="IMG",
                   help="image file; repeat for several images (prompted as 'Image-1: <image>' ...)")
    p.add_argument("--max-new-tokens", type=int, default=default_max_new_tokens)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 disables")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stream", action="store_true", help="print text as it is decoded")
    p.add_argument("--video", metavar="FILE", help="a video file instead of images: frames sampled uniformly, "
                   "one tile each, prompted 'Frame1: <image>' ...")
    p.add_argument("--num-frames", type=int, default=8, help="frames sampled from --video (default 8)")
    p.add_argument("--draw", metavar="OUT", help="draw the answer's grounding boxes (<ref>..</ref><box>[[..]]</box>) "
                   "on the first image and save it to OUT")


def _generation_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)


def _print_result(result, streamed: bool) -> None:
    if not streamed:
        print(result.text)
    t = result.timings
    print(f"\n[{result.prompt_tokens} prompt tokens, tiles per image {result.tiles_per_image}, "
          f"{len(result.token_ids)} new tokens, stop: {result.stop_reason}]", file=sys.stderr)
    print(f"[preprocess {t.preprocess_ms:.1f} ms | vision {t.vision_ms:.1f} ms | prefill {t.prefill_ms:.1f} ms | "
          f"first token {t.time_to_first_token_ms:.1f} ms | decode {t.decode_tokens_per_s:.1f} tokens/s]",
          file=sys.stderr)


def _run(model, args) -> None:
    kwargs = _generation_kwargs(args)
    if args.video:
        kwargs.update(video=args.video, num_frames=args.num_frames)
    if args.draw and not args.image:
        raise ValueError("--draw needs an --image to draw the boxes on")
    if args.stream:
        for piece in model.stream(args.prompt, args.image or None, **kwargs):
            print(piece, end="", flush=True)
        print()
        _print_result(model.last_result, streamed=True)
    else:
        _print_result(model.generate(args.prompt, args.image or None, **kwargs), streamed=False)
    if args.draw:
        _draw(model.last_result.text, args.image[0], args.draw)


def _draw(answer: str, image_path: str, out: str) -> None:
    from .formats.grounding import draw_boxes, parse_boxes
    from .preprocess import load_image

    image = load_image(image_path)
    parsed = parse_boxes(answer, image.width, image.height)
    draw_boxes(image, parsed.boxes).save(out)
    print(f"[drew {len(parsed.boxes)} box(es) on {image_path} -> {out}]", file=sys.stderr)
    for problem in parsed.problems:
        print(f"[grounding: {problem}]", file=sys.stderr)


def cmd_generate(args) -> None:
    from . import EdgeVL

    model = EdgeVL.from_pretrained(args.model, backend=args.backend, device=args.device, dtype=args.dtype,
                                   max_seq=args.max_seq, num_threads=args.threads, cuda_graph=args.cuda_graph,
                                   allow_special_tokens=args.allow_special_tokens)
    _run(model, args)


def cmd_export(args) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  torch.onnx.export's exporter
        import torch  # noqa: F401

        from .export import export_model
    except ImportError as e:
        raise ImportError(f"edgevl export needs torch, onnx and onnxscript ({e}): pip install 'edgevl[export]'") \
            from None
    manifest = export_model(args.model, args.out, precision=args.precision, max_tiles=args.max_tiles,
                            max_seq=args.max_seq, calib_images=args.calib_images)
    print(f"exported to {manifest.parent} (run it: edgevl generate --model {manifest.parent} ...)")


def cmd_selftest(args) -> int:
    if args.full:
        return _full_selftest(args)
    if args.out:
        raise ValueError("--out DIR goes with --full; the plain selftest writes JSON with --json FILE")
    from .selftest import format_report, selftest, write_json

    backends = "auto" if args.backends == "auto" else [b.strip() for b in args.backends.split(",")]
    report = selftest(backends, keep=args.keep, families=args.families.split(","))
    print(format_report(report))
    if args.json:
        write_json(report, args.json)
    return 0 if report.passed else 1


def _full_selftest(args) -> int:
    from .gpu_check import run_check, verdict

    if not args.out:
        raise ValueError("--full needs --out DIR: report.json and report.md are written there")
    if args.backends != "auto" or args.keep or args.json or args.families != "qwen2,internlm2,phi3":
        raise ValueError("--full runs every backend and family and writes DIR/selftest.json: drop --backends, "
                         "--families, --keep and --json")
    report = run_check(args.out)
    print(verdict(report))
    return 0 if report["passed"] else 1


def cmd_build(args) -> None:
    try:
        from .export.trt import build_engines
    except ImportError as e:
        raise ImportError(f"edgevl build needs onnx ({e}): pip install 'edgevl[export,gpu]'") from None
    manifest = build_engines(args.out, precision=args.precision, max_tiles=args.max_tiles, max_seq=args.max_seq,
                             workspace_gb=args.workspace_gb, timing_cache=args.timing_cache,
                             calib_images=args.calib_images, kv_cache=args.kv_cache)
    print(f"built TensorRT plans into {manifest.parent}")


def cmd_doctor(args) -> None:
    import json

    from .doctor import diagnose, format_report

    report = diagnose()
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))


def cmd_demo(args) -> None:
    from . import EdgeVL
    from .testing.checkpoints import write_tiny_checkpoint
    from .synthetic import write_demo_image

    with _work_dir(args.keep, "edgevl-demo-") as work:
        print(f"edgevl demo: TINY RANDOM-WEIGHT {args.family} InternVL checkpoint (not a trained model: the "
              f"text below is meaningless; it shows the pipeline runs end to end)\n  checkpoint: {work / 'model'}")
        write_tiny_checkpoint(work / "model", family=args.family)
        if not args.video:
            args.image = args.image or [str(write_demo_image(work / "demo.png"))]
        print(f"  input: {args.video or args.image[0]}\n  stages: tiling -> vision encoder -> prompt -> KV-cached "
              "decode\n")
        model = EdgeVL.from_pretrained(work / "model", backend="torch")
        _run(model, args)


@contextmanager
def _work_dir(keep, prefix: str):
    """keep, or a temporary directory removed on every way out."""
    if keep:
        yield Path(keep)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgevl", description="Run Mini-InternVL vision-language models on "
                                     "edge hardware. Checkpoints are local directories; nothing is downloaded.")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="on an error, print the Python traceback too")

    gen = sub.add_parser("generate", parents=[common], help="answer a prompt about images with a local checkpoint",
                         description="Load a local InternVL checkpoint (original InternVLChatModel or -hf "
                         "format) and answer a prompt about one or more images.")
    gen.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer)")
    gen.add_argument("--backend", default=None, choices=list(BACKENDS),
                     help="default: tensorrt for an export with `edgevl build` plans on a machine that can run "
                     "them, else onnxruntime for an `edgevl export` directory, torch for a checkpoint")
    gen.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: cores)")
    gen.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the backend's: cuda for tensorrt, "
                     "else cpu)")
    gen.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    gen.add_argument("--max-seq", type=int, default=None, help="KV cache length (default: the model's context)")
    gen.add_argument("--allow-special-tokens", action="store_true", help="parse special tokens typed in --prompt "
                     "(<|im_start|>, <img>, ...) as InternVL's chat() does; by default they are plain text")
    gen.add_argument("--cuda-graph", action="store_true", help="tensorrt: replay each decode step as a captured CUDA "
                     "graph (plans built with `edgevl build --kv-cache fixed`)")
    _add_generation_args(gen)
    gen.set_defaults(func=cmd_generate)

    exp = sub.add_parser("export", parents=[common], help="export a checkpoint to ONNX for ONNX Runtime / TensorRT",
                         description="Export a local checkpoint to vision.onnx + decoder.onnx (KV cache) + "
                         "manifest.json (--precision below); fp16/int8/int4 print and record their drift against "
                         "fp32.")
    exp.add_argument("--model", required=True, help="checkpoint directory")
    exp.add_argument("--out", required=True, help="output directory (empty, or an earlier export to replace)")
    exp.add_argument("--precision", default="fp32", choices=list(EXPORT_PRECISIONS),
                     help=precision_help(EXPORT_PRECISIONS) + " (default fp32)")
    exp.add_argument("--max-tiles", type=int, default=13, help="largest tile batch for vision (13 = 12 + "
                     "thumbnail; ~40 for video)")
    exp.add_argument("--max-seq", type=int, default=4096, help="longest sequence (prompt + answer) the KV cache "
                     "holds")
    exp.add_argument("--calib-images", default=None, metavar="DIR",
                     help="images to calibrate int8 vision on (default: generated synthetic images)")
    exp.set_defaults(func=cmd_export)

    st = sub.add_parser("selftest", parents=[common], help="check every backend and kernel this machine can run "
                        "against the reference (run this first on a new device)",
                        description="Writes tiny random checkpoints for each LLM family, exports them and compares "
                        "every backend this machine can run (PyTorch, ONNX Runtime CPU/CUDA at fp32/int8/int4, "
                        "TensorRT, CUDA kernels) with the reference. Exit status 0 only if at least one check ran "
                        "and every check passed.")
    st.add_argument("--backends", default="auto", help="auto, or a comma list of: pytorch, onnxruntime-cpu, "
                    "onnxruntime-cuda, tensorrt, kernels")
    st.add_argument("--json", metavar="FILE", help="also write the results as JSON (schema: edgevl.selftest)")
    st.add_argument("--keep", metavar="DIR", help="keep the checkpoints and exports here; a later run with the same "
                    "DIR checks the kept exports instead of making them again (made again where another edgevl "
                    "made them or a file changed). Where PyTorch is missing (a Jetson: copy DIR there) the kept "
                    "int8/int4 exports are checked against the kept fp32 one on that CPU")
    st.add_argument("--families", default="qwen2,internlm2,phi3", help="LLM families to check (default: all)")
    st.add_argument("--full", action="store_true", help="the whole GPU check (DEVICE.md): the GPU tests, this "
                    "selftest and the GPU benchmark rows, judged pass / fail / not run; exit 0 only if all passed")
    st.add_argument("--out", metavar="DIR", help="--full: where report.json, report.md and the logs go")
    st.set_defaults(func=cmd_selftest)

    bld = sub.add_parser("build", parents=[common], help="compile an export into TensorRT plans for this machine's GPU",
                         description="Build vision.plan and decoder.plan from an `edgevl export --precision fp32` "
                         "directory, in place, and record TensorRT version, GPU and precisions in its manifest. "
                         "Needs an NVIDIA GPU and TensorRT; plans only run on the GPU model and TensorRT version "
                         "that built them.")
    bld.add_argument("out", metavar="OUT", help="an `edgevl export` directory; the plans are written into it")
    bld.add_argument("--precision", default="fp16", choices=list(BUILD_PRECISIONS),
                     help=precision_help(BUILD_PRECISIONS) + " (default fp16)")
    bld.add_argument("--max-tiles", type=int, default=None, help="largest tile batch (default: the export's)")
    bld.add_argument("--max-seq", type=int, default=None, help="KV cache positions (default: the export's)")
    bld.add_argument("--kv-cache", default="concat", choices=["concat", "fixed"],
                     help="decoder KV cache: concat (grows per token; cheapest per step) or fixed (max_seq capacity, "
                     "static decode shapes: needed for `generate --cuda-graph`)")
    bld.add_argument("--workspace-gb", type=float, default=4.0, help="TensorRT builder workspace cap (default 4)")
    bld.add_argument("--timing-cache", default=None, metavar="FILE",
                     help="kernel timing cache to read and update (speeds up rebuilds on the same GPU)")
    bld.add_argument("--calib-images", default=None, metavar="DIR",
                     help="images to calibrate int8 vision on when the export's vision is fp32 (default: generated)")
    bld.set_defaults(func=cmd_build)

    doc = sub.add_parser("doctor", parents=[common],
                         help="show what this machine can run (GPU, CUDA, TensorRT, ONNX Runtime)",
                         description="Print GPU, compute capability, CUDA driver, cuda-python, NVRTC, TensorRT, "
                         "ONNX Runtime providers, and why each backend is or is not available.")
    doc.add_argument("--json", action="store_true", help="print the report as JSON")
    doc.set_defaults(func=cmd_doctor)

    demo = sub.add_parser("demo", parents=[common],
                          help="run the whole pipeline on a built-in tiny RANDOM-weight model",
                          description="Write a tiny random-weight InternVL checkpoint and a synthetic image, then "
                          "run tiling -> vision -> prompt -> decode and print text and timings. The weights are "
                          "random: the text is meaningless; the point is that every stage runs.")
    demo.add_argument("--family", default="qwen2", choices=["qwen2", "internlm2", "phi3"],
                      help="LLM family of the tiny model (qwen2 = InternVL2-1B's)")
    demo.add_argument("--keep", metavar="DIR", help="write the checkpoint and image here instead of a temp dir")
    _add_generation_args(demo, default_prompt="Describe this image.", default_max_new_tokens=32)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print(f"edgevl {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line naming what was wrong; --debug for the traceback
        if args.debug:
            raise
        print(f"edgevl {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: Exception) -> str:
    from .errors import SettingError

    if isinstance(e, SettingError):
        return f"{e.flag} {e.value}: {e.requirement}"
    # edgevl's own errors and the usual user mistakes say what is wrong; anything else is a bug to report.
    expected = (ValueError, OSError, ImportError, RuntimeError, TypeError)
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, expected) else f"{type(e).__name__}: {text} (unexpected: rerun with --debug)"


if __name__ == "__main__":
    sys.exit(main())
