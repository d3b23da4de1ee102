"""A run's results as people read them: a Markdown table, PNG plots, and the change between two runs."""
from __future__ import annotations

from pathlib import Path

GIB, MIB = 1 << 30, 1 << 20


def _spread(stat: dict | None, digits: int = 0, scale: float = 1.0) -> str:
    """median [min-max] of a stats dict; '-' when absent."""
    if not stat:
        return "—"
    f = lambda v: f"{v * scale:,.{digits}f}"  # noqa: E731
    if stat["n"] == 1 or stat["min"] == stat["max"]:
        return f(stat["median"])
    return f"{f(stat['median'])} [{f(stat['min'])}–{f(stat['max'])}]"


def _num(value, fmt: str, missing: str = "—") -> str:
    return missing if value is None else format(value, fmt)


def _precision(row: dict) -> str:
    p = row.get("precision") or {}
    return f"{p.get('vision', '?')}/{p.get('decoder', '?')}"


def _size(row: dict) -> str:
    loaded, whole = row.get("model_bytes"), row.get("model_dir_bytes")
    if loaded is None:
        return "—"
    return f"{loaded / GIB:.2f}" + (f" / {whole / GIB:.2f}" if whole and whole - loaded > 1 << 20 else "")


def _export(row: dict) -> str:
    if row.get("export_s") is None:
        return "—"
    peak = row.get("export_peak_rss_bytes")
    return f"{row['export_s']:.0f}" + (f" ({peak / GIB:.1f})" if peak else "")


def _drift(row: dict) -> str:
    d = row.get("drift")
    if not d:
        return "reference" if row.get("available") else "—"
    return (f"emb cos {d['image_embeds_cosine_min']:.4f}, logits cos {d['next_token_logits_cosine_min']:.4f}, "
            f"greedy {d['greedy_token_agreement']:.2f}")


def format_table(result: dict) -> str:
    """The main table (medians [min–max] over repeats), the roofline, the ratios to transformers eager."""
    tiles = [str(t) for t in result["config"]["tiles"]]
    head = (["backend", "precision (vision/decoder)", "preprocess ms"] + [f"vision ms, {t} tile{'s' * (t != '1')}"
                                                                         for t in tiles]
            + ["TTFT ms", "decode tok/s", "peak RSS GiB (GPU in use)", "size GiB (loaded / dir)",
               "export s (peak RSS GiB)", "drift vs fp32"])
    lines = _md_header(head, text_columns=2)
    unavailable = []
    for row in result["rows"]:
        if not row.get("available"):
            unavailable.append(f"- {row['backend']}: not available: {row.get('reason')}")
            continue
        lines.append("| " + " | ".join([
            row["backend"], _precision(row), _spread(row.get("preprocess_ms"), 1),
            *[_spread(row.get("vision_ms", {}).get(t)) for t in tiles],
            _spread(row.get("ttft_ms")), _spread(row.get("decode_tokens_per_s"), 1),
            _num(row.get("peak_rss_bytes") and row["peak_rss_bytes"] / GIB, ".2f")
            + (f" ({row['peak_device_bytes'] / GIB:.2f})" if row.get("peak_device_bytes") else ""),
            _size(row),
            _export(row), _drift(row)]) + " |")
    c = result["config"]
    notes = [
        "", f"Medians [min–max] over {c['repeat']} repeats after warm-up. preprocess: CPU tiling + normalisation of "
        f"a {c['frame']} frame (edgevl's code for every row; GPU tiling: not measured on a CPU run). vision: "
        "vision tower + projector for that many tiles. TTFT: from the call to the first token, tiling, vision and "
        f"prefill included, 1 tile + a {c['prompt_tokens']}-text-token question "
        f"({_first(result, 'prompt_tokens')} prompt tokens in all). decode: tokens/s over the {c['new_tokens']} "
        "new tokens after the first. peak RSS: the backend's own process (VmHWM). size: the files the backend "
        "loads (graphs, the external data they reference, embedding table, tokenizer) / the whole directory when it "
        "holds more. "
        "export: `edgevl export` wall time (int8/int4 include their fp32 export and the drift check) and its "
        "process's peak RSS (with its torch export subprocesses). drift: from the export manifest (image-embedding "
        "cosine min, next-token logits cosine min, greedy-token agreement)."]
    out = ["### Results", "", *lines, *notes, *([""] + unavailable if unavailable else [])]
    out += ["", "### Decode roofline", "", *_roofline_table(result), "", "### Relative to transformers eager", "",
            *_ratio_table(result, tiles)]
    if c.get("contexts"):
        out += ["", "### Cost of context", "", *_context_table(result)]
    return "\n".join(out)


def _context_table(result: dict) -> list[str]:
    lines = _md_header(["backend", "positions (prompt)", "TTFT ms", "prefill ms", "decode tok/s", "RSS GiB"])
    for row in result["rows"]:
        for point in row.get("context_curve", []) if row.get("available") else []:
            if "reason" in point:
                lines.append(f"| {row['backend']} | {point['positions']}: {point['reason']} | | | | |")
                continue
            lines.append(f"| {row['backend']} | {point['positions']} ({point['prompt_tokens']}) | "
                         f"{_spread(point['ttft_ms'])} | {_spread(point['prefill_ms'])} | "
                         f"{_spread(point['decode_tokens_per_s'], 1)} | {point['rss_bytes'] / GIB:.2f} |")
    c = result["config"]
    lines += ["", f"Each point: generations of {c['new_tokens']} tokens from a fresh cache, 1 tile + text, the last "
              "token at that position; decode tokens/s over the answer; RSS of the backend's process after them."]
    return lines


def _first(result: dict, key: str):
    return next((r[key] for r in result["rows"] if r.get("available") and key in r), "?")


def _md_header(head: list[str], text_columns: int = 1) -> list[str]:
    align = ["---" if i < text_columns else "---:" for i in range(len(head))]
    return ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]


def _roofline_table(result: dict) -> list[str]:
    bw = result["bandwidth"]["read_bytes_per_s"]
    lines = [f"Measured read bandwidth {bw / 1e9:.1f} GB/s (best of numpy sum / BLAS gemv; copy "
             f"{result['bandwidth']['copy_bytes_per_s'] / 1e9:.1f} GB/s read+write). Ceiling = bandwidth / (weights "
             "+ KV cache read per decoded token).", ""]
    lines += _md_header(["backend", "MB read per token (weights + KV)", "ceiling tok/s", "measured tok/s",
                         "fraction of ceiling"])
    for row in result["rows"]:
        r = row.get("roofline")
        if not row.get("available") or not r:
            continue
        lines.append(f"| {row['backend']} | {r['weights_bytes_per_token'] / 1e6:,.1f} + "
                     f"{r['kv_bytes_per_token'] / 1e6:,.1f} | {r['ceiling_tokens_per_s']:.1f} | "
                     f"{row['decode_tokens_per_s']['median']:.1f} | "
                     f"{r['fraction']:.0%} |")
    return lines


def _ratio_table(result: dict, tiles: list[str]) -> list[str]:
    reference = next((r for r in result["rows"] if r["backend"] == "transformers" and r.get("available")), None)
    if reference is None:
        return ["transformers eager was not measured in this run (not installed, or no -hf checkpoint)."]
    lines = _md_header(["backend"] + [f"vision speed-up, {t} tile{'s' * (t != '1')}" for t in tiles]
                       + ["TTFT speed-up", "decode speed-up", "peak RSS ratio"])
    for row in result["rows"]:
        if not row.get("available"):
            continue
        v = row["vs_transformers"]
        lines.append("| " + " | ".join([row["backend"], *[_num(v["vision"].get(t), ".2f") + "x" for t in tiles],
                                         _num(v["ttft"], ".2f") + "x", _num(v["decode"], ".2f") + "x",
                                         _num(v["peak_rss"], ".2f") + "x"]) + " |")
    lines.append("")
    lines.append("Speed-up = transformers time / row time (decode: row tokens/s / transformers tokens/s); "
                 "RSS ratio = row / transformers.")
    return lines


def write_plots(result: dict, out_dir: Path, stem: str) -> list[Path]:
    """decode tokens/s and TTFT per backend (bars, min–max as error bars); vision latency vs tile count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("available")]
    names = [r["backend"] for r in rows]
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label, scale in ((axes[0], "decode_tokens_per_s", "decode tokens/s (higher is better)", 1),
                                  (axes[1], "ttft_ms", "time to first token, s (lower is better)", 1e-3)):
        med = [r[key]["median"] * scale for r in rows]
        err = [[(r[key]["median"] - r[key]["min"]) * scale for r in rows],
               [(r[key]["max"] - r[key]["median"]) * scale for r in rows]]
        ax.bar(names, med, yerr=err, capsize=4, color="#4878a8")
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        for i, m in enumerate(med):
            ax.annotate(f"{m:.2f}" if scale != 1 else f"{m:.1f}", (i, m), ha="center", va="bottom", fontsize=8)
    ceilings = [r.get("roofline", {}).get("ceiling_tokens_per_s") for r in rows]
    axes[0].scatter(names, ceilings, marker="_", s=600, color="#c44e52", label="bandwidth ceiling", zorder=3)
    axes[0].legend(fontsize=8)
    fig.suptitle(_title(result), fontsize=9)
    fig.tight_layout()
    paths.append(_save(fig, out_dir / f"{stem}-decode-ttft.png"))
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for r in rows:
        tiles = sorted(int(t) for t in r["vision_ms"])
        ax.errorbar(tiles, [r["vision_ms"][str(t)]["median"] / 1e3 for t in tiles],
                    yerr=[[(r["vision_ms"][str(t)]["median"] - r["vision_ms"][str(t)]["min"]) / 1e3 for t in tiles],
                          [(r["vision_ms"][str(t)]["max"] - r["vision_ms"][str(t)]["median"]) / 1e3 for t in tiles]],
                    marker="o", capsize=3, label=r["backend"])
    ax.set_xlabel("tiles")
    ax.set_ylabel("vision + projector, s")
    ax.set_title(_title(result), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(_save(fig, out_dir / f"{stem}-vision.png"))
    curves = [(r["backend"], [p for p in r["context_curve"] if "reason" not in p])
              for r in rows if r.get("context_curve")]
    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for name, points in curves:
            positions = [p["positions"] for p in points]
            axes[0].plot(positions, [p["decode_tokens_per_s"]["median"] for p in points], marker="o", label=name)
            axes[1].plot(positions, [p["ttft_ms"]["median"] / 1e3 for p in points], marker="o", label=name)
        for ax, label in ((axes[0], "decode tokens/s"), (axes[1], "time to first token, s")):
            ax.set_xlabel("positions at the last token")
            ax.set_title(label, fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(_title(result), fontsize=9)
        fig.tight_layout()
        paths.append(_save(fig, out_dir / f"{stem}-context.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _title(result: dict) -> str:
    c, m = result["config"], result["machine"]
    return (f"{c['model']} random weights · {m['cpu_model']} · {m['cpus']} CPUs · prompt {c['prompt_tokens']} "
            f"text tokens + 1 tile · {c['new_tokens']} new tokens · {c['repeat']} repeats")


def compare(a: dict, b: dict) -> str:
    """Per backend and figure: a, b and the change (b / a), for two result JSONs."""
    lines = [f"Comparing A = {a.get('started')} ({a['config']['model']}) with B = {b.get('started')} "
             f"({b['config']['model']})", ""]
    lines += _md_header(["backend", "figure", "A", "B", "B / A"], text_columns=2)
    rows_b = {r["backend"]: r for r in b["rows"] if r.get("available")}
    for ra in a["rows"]:
        rb = rows_b.get(ra["backend"])
        if not ra.get("available") or rb is None:
            continue
        for label, get in _FIGURES:
            va, vb = get(ra), get(rb)
            if va is None or vb is None:
                continue
            ratio = vb / va if va else float("nan")
            lines.append(f"| {ra['backend']} | {label} | {va:,.1f} | {vb:,.1f} | {ratio:.2f} |")
    only = sorted(set(rows_b) ^ {r["backend"] for r in a["rows"] if r.get("available")})
    if only:
        lines += ["", f"In only one of the runs: {', '.join(only)}"]
    return "\n".join(lines)


def _median(*keys):
    def get(row):
        value = row
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        return value["median"] if isinstance(value, dict) else value
    return get


_FIGURES = [("preprocess ms", _median("preprocess_ms")), ("vision ms, 1 tile", _median("vision_ms", "1")),
            ("vision ms, 7 tiles", _median("vision_ms", "7")), ("TTFT ms", _median("ttft_ms")),
            ("decode tok/s", _median("decode_tokens_per_s")),
            ("peak RSS MiB", lambda r: r.get("peak_rss_bytes") and r["peak_rss_bytes"] / MIB)]


def machine_line(m: dict) -> str:
    """A benchmarks.machine.describe() in one line: CPU, cores, RAM, ISA classes, how ONNX Runtime computes int8
    there, and the ISA mask it ran under, if any."""
    # ISA classes and how ONNX Runtime computes int8 on them (older results list lscpu flags instead).
    flags = ", ".join(m.get("isa") or m.get("flags_of_note") or [])
    if m.get("integer_gemm"):
        flags += f"; int8 GEMM: {m['integer_gemm']['description']}"
    if m.get("isa_mask"):
        flags += f"; **ISA mask: {m['isa_mask']}**"
    return (f"{m['cpu_model']}, {m['cpus']} CPUs ({m.get('cores_per_socket')} cores x {m.get('threads_per_core')} "
            f"threads), {m['ram_bytes'] / GIB:.1f} GiB RAM, {m.get('hypervisor') or 'bare metal'} VM; {flags}")


def run_header(result: dict) -> str:
    """Command, machine, versions, threads, bandwidth and what else was running: what a reader needs to judge
    the table."""
    m, c, bw = result["machine"], result["config"], result["bandwidth"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    threads = _thread_summary(result)
    lines = [
        f"- command: `{result['command']}`",
        f"- started {result['started']}, took {result.get('duration_s', 0) / 60:.1f} min "
        "(exports excluded when cached)",
        f"- model: {c['model']} (`{c['model_dir']}`), random weights",
        f"- machine: {machine_line(m)}",
        f"- {m['os']}, Python {m['python']}; {versions}",
        f"- threads: {threads}; thread env: {m['thread_env'] or 'none set'} "
        f"(OPENBLAS_CORETYPE {m['thread_env'].get('OPENBLAS_CORETYPE', 'not set')})",
        f"- malloc in every worker: {c.get('malloc', 'glibc defaults')}",
        f"- ONNX Runtime graphs (vision, decoder): {_graphs(result)}",
        f"- memory bandwidth ({bw['buffer_bytes'] / GIB:.1f} GiB buffer, best of repeats): sum 1 thread "
        f"{bw['sum_1_thread_bytes_per_s'] / 1e9:.1f} GB/s, sum all cores "
        f"{next(v for k, v in bw.items() if k.startswith('sum_') and '_1_' not in k) / 1e9:.1f} GB/s, BLAS gemv "
        f"{bw['gemv_bytes_per_s'] / 1e9:.1f} GB/s, copy {bw['copy_bytes_per_s'] / 1e9:.1f} GB/s (read+write)",
        f"- also running: {_background(result)}",
    ]
    return "\n".join(lines)


def _graphs(result: dict) -> str:
    """Which graphs each ONNX Runtime row ran (vision_amx.onnx, decoder_avx2.onnx: on edgevl's ops)."""
    graphs = [f"{row['backend']} {row.get('vision_graph', '?')}, {row['decoder_graph']}" for row in result["rows"]
              if row.get("decoder_graph")]
    return " · ".join(graphs) or "none run"


def _thread_summary(result: dict) -> str:
    parts = []
    for row in result["rows"]:
        t = row.get("threads") or {}
        if not row.get("available"):
            continue
        pools = ", ".join(f"{p['internal_api']} {p['num_threads']}" + (f" ({p['architecture']})" if p.get(
            "architecture") else "") for p in (t.get("threadpools") or []))
        extra = (f"torch {t['torch_threads']}" if "torch_threads" in t else "") + (
            f"ORT intra-op {t['onnxruntime_intra_op'] or 'default (physical cores)'}" if "onnxruntime_intra_op" in t
            else "")
        parts.append(f"{row['backend']}: {extra}{'; ' if extra and pools else ''}{pools}")
    return " · ".join(parts)


def _background(result: dict) -> str:
    samples = [result["background"].get("before"), result["background"].get("after")] + [
        r.get("others_busy_before") for r in result["rows"] if r.get("others_busy_before")]
    busy = {}
    for s in samples:
        for p in (s or {}).get("busy_processes") or []:
            busy.setdefault(p["command"][:80], []).append(p["cpu_percent"])
    loads = [s["loadavg_1_5_15"][0] for s in samples if s]
    text = f"1-min load average {min(loads):.2f}–{max(loads):.2f} at the samples"
    if busy:
        text += "; other processes seen using CPU: " + "; ".join(
            f"`{cmd}` (up to {max(p):.0f}%)" for cmd, p in busy.items())
    else:
        text += "; no other process above 5% CPU at the samples"
    return text
