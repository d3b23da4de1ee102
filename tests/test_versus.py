"""`python -m benchmarks versus`: the interleaving of rounds, the figures it pairs and the ratios it takes."""
import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from benchmarks.__main__ import main
from benchmarks.versus import load_rounds, run_rounds, summarize

REPO_ROOT = Path(__file__).resolve().parents[1]


def _stat(median):
    return {"median": median, "min": median, "max": median, "n": 1}


def _edgevl(decode8, decode4, positions=662):
    def row(backend, decode, vision, ttft, prefill):
        return {"backend": backend, "available": True, "prompt_tokens": positions,
                "decode_tokens_per_s": _stat(decode), "vision_ms": {"1": _stat(vision)}, "ttft_ms": _stat(ttft),
                "ttft_parts_ms": {"prefill": _stat(prefill)}}
    return {"rows": [row("ort-int8", decode8, 2000.0, 4000.0, 1500.0), row("ort-int4", decode4, 2500.0, 5000.0, 2000.0),
                     {"backend": "ort-fp32", "available": False}]}


def _baselines(llama8, ortgenai8, ortgenai_skipped=False):
    rows = [{"tool": "llama.cpp", "precision": "Q8_0", "decode_tok_s": _stat(llama8), "prefill_ms": _stat(3000.0),
             "ttft_ms": _stat(3100.0), "vision_ms_per_tile": _stat(5000.0)},
            {"tool": "llama.cpp", "precision": "Q4_0", "decode_tok_s": _stat(60.0), "prefill_ms": _stat(2400.0),
             "ttft_ms": _stat(2500.0), "vision_ms_per_tile": _stat(5000.0)}]
    if ortgenai_skipped:
        rows.append({"tool": "ortgenai_rows", "precision": "all", "skipped": "no onnxruntime-genai"})
    else:
        rows += [{"tool": "onnxruntime-genai", "precision": "int8", "decode_tok_s": _stat(ortgenai8),
                  "prefill_ms": _stat(6000.0), "ttft_ms": _stat(6000.0)},
                 {"tool": "onnxruntime-genai", "precision": "int4", "decode_tok_s": _stat(64.0),
                  "prefill_ms": _stat(4000.0), "ttft_ms": _stat(4000.0)}]
    return {"rows": rows}


def test_ratios_pair_each_precision_and_take_the_median_over_rounds():
    rounds = [{"order": ["edgevl", "baselines"], "edgevl": _edgevl(48.0, 80.0), "baselines": _baselines(40.0, 40.0)},
              {"order": ["baselines", "edgevl"], "edgevl": _edgevl(45.0, 72.0), "baselines": _baselines(30.0, 36.0)},
              {"order": ["edgevl", "baselines"], "edgevl": _edgevl(50.0, 70.0), "baselines": _baselines(50.0, 40.0)}]
    summary = summarize(rounds, ("int8", "int4"), lead=1.2)
    int8, int4 = summary["precisions"]["int8"], summary["precisions"]["int4"]
    first = int8["rounds"][0]["ratios"]
    assert first["decode vs llama.cpp"] == pytest.approx(48 / 40)
    assert first["decode vs onnxruntime-genai"] == pytest.approx(48 / 40)
    assert first["vision vs llama.cpp"] == pytest.approx(5000 / 2000)
    assert first["TTFT vs llama.cpp"] == pytest.approx((3100 + 5000) / 4000)  # llama.cpp's vision added
    assert first["prefill vs llama.cpp"] == pytest.approx(3000 / 1500)
    assert first["prefill vs onnxruntime-genai"] == pytest.approx(6000 / 1500)
    # medians of the three rounds' ratios, not ratios of medians
    assert int8["median"]["decode vs llama.cpp"] == pytest.approx(48 / 40)  # of 1.2, 1.5, 1.0
    assert int8["median"]["decode vs onnxruntime-genai"] == pytest.approx(1.25)  # of 1.2, 1.25, 1.25
    assert int8["meets"]["decode vs llama.cpp"] is True and int8["meets"]["decode vs onnxruntime-genai"] is True
    assert int4["median"]["decode vs llama.cpp"] == pytest.approx(72 / 60)
    assert int4["median"]["decode vs onnxruntime-genai"] == pytest.approx(72 / 64)
    assert int4["meets"]["decode vs onnxruntime-genai"] is False  # 1.125 < 1.2
    assert int4["meets"]["vision vs llama.cpp"] is True  # 2.0 >= 1.0: the bar is 1.0 but for decode


def test_a_skipped_peer_leaves_its_ratios_empty_not_zero():
    rounds = [{"order": ["edgevl", "baselines"], "edgevl": _edgevl(48.0, 80.0),
               "baselines": _baselines(40.0, 0.0, ortgenai_skipped=True)}]
    int8 = summarize(rounds, ("int8",), lead=1.2)["precisions"]["int8"]
    assert int8["median"]["decode vs onnxruntime-genai"] is None
    assert int8["meets"]["prefill vs onnxruntime-genai"] is None
    assert int8["median"]["decode vs llama.cpp"] == pytest.approx(1.2)


def test_rounds_alternate_and_the_baselines_prompt_as_many_tokens_as_edgevl_had_positions(tmp_path):
    calls = []

    def step(kind, command, log_path, log):  # writes what each command would, records what ran
        calls.append((kind, command))
        log_path.write_text("ok\n")
        out = Path(command[command.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        if "run" in command:
            (out / "internvl2-1b.json").write_text(json.dumps(_edgevl(48.0, 80.0, positions=639)))
        else:
            (out / "baselines.json").write_text(json.dumps(_baselines(40.0, 40.0)))

    model = tmp_path / "ckpt"
    args = Namespace(model=model, shape=None, cache=tmp_path / "cache", precisions=("int8", "int4"), rounds=3,
                     prompt_tokens=300, new_tokens=16, repeat=1, threads=2, llama_cpp=Path("/opt/llama"),
                     ortgenai_python=None)
    rounds = run_rounds(args, tmp_path / "out", log=lambda msg: None, step=step)
    assert [kind for kind, _ in calls] == ["round 1/3 edgevl", "round 1/3 baselines", "round 2/3 baselines",
                                           "round 2/3 edgevl", "round 3/3 edgevl", "round 3/3 baselines"]
    baselines = calls[1][1]
    assert baselines[baselines.index("--prompt-tokens") + 1] == "639"
    assert baselines[baselines.index("--llama-types") + 1] == "Q8_0,Q4_0"
    assert baselines[baselines.index("--model") + 1] == str(model) and "--ortgenai-python" not in baselines
    edgevl = calls[0][1]
    assert edgevl[edgevl.index("--backends") + 1] == "ort-int8,ort-int4"
    assert [r["order"] for r in rounds] == [["edgevl", "baselines"], ["baselines", "edgevl"], ["edgevl", "baselines"]]
    assert [r["order"] for r in load_rounds(tmp_path / "out")] == [r["order"] for r in rounds]  # --from-rounds reads


def test_cli_summarizes_rounds_on_disk_and_names_a_directory_without_them(tmp_path, capsys):
    assert main(["versus", "--from-rounds", "--out", str(tmp_path)]) == 2
    assert f"{tmp_path}: no round-N directories" in capsys.readouterr().err
    round_dir = tmp_path / "round-1"
    (round_dir / "edgevl").mkdir(parents=True)
    # a real report's header fields (machine, bandwidth, background), this test's rows
    header = json.loads((REPO_ROOT / "benchmarks/results/internvl2-1b-zen4-avx2mask-rounds-2026-12-02/"
                         "r1-edgevl.json").read_text())
    (round_dir / "edgevl" / "x.json").write_text(json.dumps(header | _edgevl(48.0, 80.0)))
    (round_dir / "baselines.json").write_text(json.dumps(_baselines(40.0, 40.0)))
    (round_dir / "order.json").write_text(json.dumps(["edgevl", "baselines"]))
    assert main(["versus", "--from-rounds", "--out", str(tmp_path), "--precisions", "int8"]) == 0
    table = (tmp_path / "versus.md").read_text()
    assert "| int8 | median of rounds |" in table and "1.20x (meets)" in table and "machine: AMD EPYC, 2 CPUs" in table
    summary = json.loads((tmp_path / "versus.json").read_text())
    assert summary["precisions"]["int8"]["median"]["decode vs llama.cpp"] == pytest.approx(1.2)
    assert summary["command"].startswith("unknown")  # these rounds came without the versus.json of their run
    # summarized again, the record keeps the command that ran the rounds and names the one that summarized them
    (tmp_path / "versus.json").write_text(json.dumps(summary | {"command": "python -m benchmarks versus --rounds 1"}))
    assert main(["versus", "--from-rounds", "--out", str(tmp_path), "--precisions", "int8", "--lead", "1.3"]) == 0
    summary = json.loads((tmp_path / "versus.json").read_text())
    assert summary["command"] == "python -m benchmarks versus --rounds 1"
    assert summary["summarized_by"].endswith("--precisions int8 --lead 1.3")
    assert "- summarized again by: `python -m benchmarks versus --from-rounds" in (tmp_path / "versus.md").read_text()


def test_threads_default_to_physical_cores_not_hardware_threads(monkeypatch):
    from benchmarks import machine

    monkeypatch.setattr(machine, "_lscpu", lambda: {"Core(s) per socket": "4", "Socket(s)": "2",
                                                    "Thread(s) per core": "2"})
    assert machine.physical_cores() == 8
    monkeypatch.setattr(machine, "_lscpu", lambda: {})  # no lscpu: every CPU the OS reports
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 6)
    assert machine.physical_cores() == 6


def test_cli_hands_the_rounds_absolute_paths_and_keeps_a_venvs_python_link(tmp_path, monkeypatch):
    import benchmarks.versus as versus

    venv_python = tmp_path / "venv" / "python"
    venv_python.parent.mkdir()
    venv_python.symlink_to(sys.executable)
    seen = {}

    def stop(args, out):  # the rounds run from the repository root: every path must survive the change of cwd
        seen.update(vars(args), out=out)
        raise RuntimeError("stopped before the rounds")

    monkeypatch.setattr(versus, "run_rounds", stop)
    monkeypatch.chdir(tmp_path)
    assert main(["versus", "--model", "ckpt", "--cache", "cache", "--ortgenai-python", "venv/python",
                 "--out", "results"]) == 2
    assert seen["model"] == tmp_path / "ckpt" and seen["cache"] == tmp_path / "cache"
    assert seen["ortgenai_python"] == venv_python and seen["out"] == tmp_path / "results"
    assert seen["llama_cpp"] is None and seen["threads"] >= 1
