"""Run a command with ONNX Runtime seeing a smaller x86 CPU than this one: another machine class's integer
kernels, at this machine's full speed (qemu's `-cpu Haswell` gives the same kernels for accuracy, ~100x slower).

    python -m benchmarks.isa_mask avx2 -- .venv/bin/python -m pytest -q tests/test_cpu.py

ONNX Runtime (MLAS) picks its kernels from the `cpuid` instruction, which user space cannot intercept here. So a
copy of the installed onnxruntime package is made (cached under --dir) whose libraries have each `cpuid` replaced
by the two-byte UD0, and an LD_PRELOAD shim (isa_mask.c, built with `cc`) answers the resulting fault with the real
cpuid minus the hidden features. The command gets that copy first on PYTHONPATH (onnxruntime-genai loads its
runtime from the same package, so its Python needs the same onnxruntime version); edgevl's own Int8MatMul is told
the class's kernels through EDGEVL_MATMUL_KERNEL. edgevl's own ISA report (its library's cpuid) still shows this
CPU: benchmark reports name the mask from EDGEVL_ISA_MASK. Figures taken under a mask are this CPU running another
class's kernels, not that class's speed.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from edgevl.cpu import MATMUL_KERNEL_ENV

LABEL_ENV = "EDGEVL_ISA_MASK"
DEFAULT_DIR = Path.home() / ".cache" / "edgevl-isa-mask"
SHIM_SOURCE = Path(__file__).with_name("isa_mask.c")
CPUID, UD0 = b"\x0f\xa2", b"\x0f\xff"

# CPUID leaf-7 feature -> (register index in the shim's ISA_MASK_CLEAR: sub-leaf 0 EBX, ECX, EDX; sub-leaf 1 EAX,
# EDX), bit). From Intel's SDM vol. 2A, CPUID, and AMD's APM vol. 3.
FEATURES = {
    "avx512f": (0, 16), "avx512dq": (0, 17), "avx512ifma": (0, 21), "avx512pf": (0, 26), "avx512er": (0, 27),
    "avx512cd": (0, 28), "avx512bw": (0, 30), "avx512vl": (0, 31),
    "avx512vbmi": (1, 1), "avx512vbmi2": (1, 6), "avx512_vnni": (1, 11), "avx512_bitalg": (1, 12),
    "avx512_vpopcntdq": (1, 14),
    "avx512_4vnniw": (2, 2), "avx512_4fmaps": (2, 3), "avx512_vp2intersect": (2, 8), "amx_bf16": (2, 22),
    "avx512_fp16": (2, 23), "amx_tile": (2, 24), "amx_int8": (2, 25),
    "avx_vnni": (3, 4), "avx512_bf16": (3, 5), "amx_fp16": (3, 21), "avx_ifma": (3, 23),
    "avx_vnni_int8": (4, 4), "avx_ne_convert": (4, 5), "amx_complex": (4, 8), "avx_vnni_int16": (4, 10),
    "avx10": (4, 19),
}
_AMX = ("amx_bf16", "amx_tile", "amx_int8", "amx_fp16", "amx_complex")
_VNNI = ("avx512_vnni", "avx512_4vnniw", "avx_vnni", "avx_vnni_int8", "avx_vnni_int16")
# Machine class -> (the features it lacks, what reports call it).
CLASSES = {
    "avx2": (tuple(FEATURES), "no AVX-512, VNNI or AMX"),  # Haswell .. Zen 3: u8 x s8 through vpmaddubsw
    "avx512": (_AMX + _VNNI + ("avx10",), "AVX-512 without VNNI, no AMX"),  # Skylake-SP: vpmaddubsw as well
    "avx512-vnni": (_AMX, "no AMX"),  # Cascade Lake .. Zen 4: AVX-512 VNNI (vpdpbusd)
}


def active_class() -> str | None:
    """The class this process's ONNX Runtime was shown by `environment`, None when unmasked."""
    label = os.environ.get(LABEL_ENV)
    return label.split(" ")[0] if label else None


def clear_words(isa_class: str) -> str:
    """The shim's ISA_MASK_CLEAR for a machine class: five hex words of the leaf-7 bits to clear."""
    words = [0] * 5
    for name in CLASSES[isa_class][0]:
        register, bit = FEATURES[name]
        words[register] |= 1 << bit
    return ",".join(f"{w:x}" for w in words)


def cpuid_offsets(library: Path) -> list[int]:
    """File offsets of every `cpuid` instruction in an ELF library's executable sections, found by objdump's
    disassembly (a byte search would also hit 0f a2 inside other instructions)."""
    sections = subprocess.run(["readelf", "-SW", library], capture_output=True, text=True, check=True).stdout
    executable = [(int(m[1], 16), int(m[2], 16), int(m[3], 16)) for m in re.finditer(
        r"\]\s+\S+\s+\S+\s+([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+\S+\s+\S*X", sections)]
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library], capture_output=True, text=True,
                             check=True).stdout
    offsets = []
    for m in re.finditer(r"^\s*([0-9a-f]+):\s+cpuid\b", listing, re.M):
        address = int(m[1], 16)
        start, offset, _ = next(s for s in executable if s[0] <= address < s[0] + s[2])
        offsets.append(address - start + offset)
    return offsets


def patch_library(src: Path, dst: Path) -> int:
    """Copy `src` to `dst` with each cpuid (0f a2) replaced by UD0; returns how many."""
    data = bytearray(src.read_bytes())
    offsets = cpuid_offsets(src)
    for offset in offsets:
        if data[offset:offset + 2] != CPUID:
            raise RuntimeError(f"{src}: objdump's cpuid at file offset {offset:#x} is {data[offset:offset + 2].hex()}")
        data[offset:offset + 2] = UD0
    dst.write_bytes(data)
    shutil.copymode(src, dst)
    return len(offsets)


def build(cache_dir: Path = DEFAULT_DIR, log=print) -> tuple[Path, Path]:
    """The masked onnxruntime package's parent directory and the shim, built once per onnxruntime install and
    version of this tool: (site_dir, shim_path)."""
    missing = [tool for tool in ("cc", "objdump", "readelf") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"benchmarks.isa_mask needs {', '.join(missing)} on PATH (a C compiler and binutils)")
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("benchmarks.isa_mask: onnxruntime is not installed in this Python")
    package = Path(spec.submodule_search_locations[0])
    libraries = sorted((package / "capi").glob("*onnxruntime*.so*"))
    key = hashlib.sha256(SHIM_SOURCE.read_bytes() + Path(__file__).read_bytes() + "".join(
        f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}\n" for p in libraries).encode()).hexdigest()[:16]
    out = cache_dir / key
    site, shim = out / "site", out / "libisamask.so"
    if (out / "done").exists():
        return site, shim
    for stale in cache_dir.glob("*/done"):  # this install's older copies (upgraded, or an older tool): 80 MB each
        if stale.read_text().strip() == str(package):
            shutil.rmtree(stale.parent)
    if out.exists():
        shutil.rmtree(out)
    log(f"[isa_mask] copying {package} and replacing its cpuid instructions (objdump, ~10 s) ...")
    shutil.copytree(package, site / "onnxruntime", ignore=shutil.ignore_patterns("__pycache__"))
    for library in libraries:
        count = patch_library(library, site / "onnxruntime" / "capi" / library.name)
        log(f"[isa_mask] {library.name}: {count} cpuid")
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", shim, SHIM_SOURCE, "-ldl"], check=True)
    (out / "done").write_text(str(package) + "\n")
    return site, shim


def environment(isa_class: str, cache_dir: Path = DEFAULT_DIR, log=print) -> dict:
    """os.environ plus what makes a child process's ONNX Runtime see `isa_class`."""
    site, shim = build(cache_dir, log)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env["LD_PRELOAD"] = " ".join(filter(None, [str(shim), env.get("LD_PRELOAD")]))
    env["ISA_MASK_CLEAR"] = clear_words(isa_class)
    env[LABEL_ENV] = f"{isa_class} (ONNX Runtime's cpuid shows {CLASSES[isa_class][1]})"
    if "avx512_vnni" in CLASSES[isa_class][0]:  # edgevl's Int8MatMul reads the real cpuid: name the class's kernels
        env[MATMUL_KERNEL_ENV] = "avx2"
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.isa_mask", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("isa_class", choices=sorted(CLASSES), help="the machine class ONNX Runtime should see")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"the masked copies (default {DEFAULT_DIR})")
    parser.usage = "python -m benchmarks.isa_mask [--dir DIR] {%s} -- COMMAND ..." % ",".join(sorted(CLASSES))
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, command = parser.parse_args(argv[:split]), argv[split + 1:]
    if not command:
        parser.error("no command given after --")
    if os.uname().machine != "x86_64":
        parser.error(f"x86-64 only (this machine is {os.uname().machine}): ARM64 classes run under qemu, "
                     "benchmarks/README.md")
    env = environment(args.isa_class, args.dir, log=lambda m: print(m, file=sys.stderr))
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    sys.exit(main())
