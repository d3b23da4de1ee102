"""benchmarks/isa_mask.py: ONNX Runtime shown a smaller x86 CPU, so that any x86 machine runs the AVX2 class's
integer kernels natively. On an AVX-512 VNNI or AMX machine this is where the suite checks the other class: the
saturating u8 x s8 product is reproduced, and edgevl's session option makes every integer op exact there."""
from __future__ import annotations

import json
import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import isa_mask

REPO = Path(__file__).resolve().parents[1]


def test_each_class_clears_the_cpuid_bits_of_what_it_lacks():
    # Leaf 7 bits from Intel's SDM: sub-leaf 0 EDX 22/24/25 = AMX-BF16/TILE/INT8, sub-leaf 1 EAX 21 = AMX-FP16,
    # sub-leaf 1 EDX 8 = AMX-COMPLEX; sub-leaf 0 EBX 16 = AVX512F, ECX 11 = AVX512_VNNI, sub-leaf 1 EAX 4 = AVX-VNNI.
    assert isa_mask.clear_words("avx512-vnni") == "0,0,3400000,200000,100"
    avx512 = [int(w, 16) for w in isa_mask.clear_words("avx512").split(",")]
    assert not avx512[0] & 1 << 16 and avx512[1] & 1 << 11 and avx512[3] & 1 << 4
    avx2 = [int(w, 16) for w in isa_mask.clear_words("avx2").split(",")]
    assert avx2[0] & 1 << 16 and all(a & b == b for a, b in zip(avx2, avx512))


needs_tools = pytest.mark.skipif(
    platform.machine() != "x86_64" or sys.platform != "linux" or not all(
        shutil.which(t) for t in ("cc", "objdump", "readelf")),
    reason="the ISA mask patches x86-64 Linux libraries with cc and binutils (objdump, readelf)")


@pytest.fixture(scope="module")
def avx2_env(tmp_path_factory):
    return isa_mask.environment("avx2", tmp_path_factory.mktemp("isa-mask"), log=lambda _: None)


def _run(env, *args, **kwargs):
    return subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True, **kwargs)


@needs_tools
def test_avx2_class_saturates_u8s8_and_edgevl_switches_to_exact_kernels(avx2_env):
    proc = _run(avx2_env, "-c", "import json; from edgevl import cpu; print(json.dumps(cpu.integer_gemm().to_dict()))")
    assert proc.returncode == 0, proc.stderr
    gemm = json.loads(proc.stdout)
    assert (gemm["u8s8_exact"], gemm["precision_mode"], gemm["exact"]) == (False, True, True), gemm


@needs_tools
def test_integer_op_tests_pass_with_the_avx2_class_kernels(avx2_env):
    # Not the tests that make an export (50 s): the whole suite under the mask is in benchmarks/README.md. The
    # rewrites' tests compare edgevl's ops with ONNX Runtime's own kernels of this class.
    proc = _run(avx2_env, "-m", "pytest", "-v", "-n", "0", "-p", "no:cacheprovider", "tests/test_cpu.py",
                "tests/test_cpu_graph.py", "-k", "not test_int8_backend_records_its_integer_path and not attention "
                "and not tensor_by_tensor", timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "test_avx2_cpus_without_vnni_switch_to_exact_kernels PASSED" in proc.stdout  # the class test ran


@needs_tools
def test_an_illegal_instruction_of_the_program_still_kills_it(avx2_env):
    proc = _run(avx2_env, "-X", "faulthandler", "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)")
    assert proc.returncode == -signal.SIGILL, (proc.returncode, proc.stderr)
    assert "Illegal instruction" in proc.stderr  # faulthandler, chained behind the mask's handler, still reports
