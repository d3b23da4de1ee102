"""The CPU this process runs on: its ISA classes, and how ONNX Runtime's integer GEMM (MLAS) computes the int8
graphs' u8 x s8 products here. Torch-free; ONNX Runtime is imported only when the product is probed.

The int8 exports multiply u8 activations (zero point 128, the full 0..255 range) by s8 weights (-127..127). On x86
without VNNI (AVX2, or AVX-512 without VNNI) MLAS pairs those products with vpmaddubsw, whose int16 sum saturates
(255 * 127 * 2 > 32767): the matmuls come out wrong, not just noisier (next-token logits cosine 0.98 instead of
0.9998 on the tiny test models; 85 of 96 outputs of a full-range 128-deep product wrong). ONNX Runtime's session
option `session.x64quantprecision` rewrites each constant s8 weight to u8 (w + 128, its zero point with it) when the
session is built, so MLAS's u8 x u8 kernels run: the same integer products, exact. edgevl sets it only where the
u8 x s8 product is measured to be wrong (`integer_gemm` runs it): with VNNI (vpdpbusd), AMX, and on ARM the u8 x s8
kernels are exact, and the u8 x u8 ones were slower on AMX. So every machine computes the same integers, and the
export's bytes are the same everywhere: an export made on one machine runs correctly on any other.

The u8 x u8 kernels are slower than the u8 x s8 ones they replace, so int8 exports also carry decoder_avx2.onnx: the
decoder with edgevl's own Int8MatMul op (kernels/ort_matmul.c, a custom-op library built with the package on x86-64),
whose AVX2 kernel computes the same u8 x s8 integers without saturating (the sign trick). int4 exports carry one too,
with Int4MatMul: MatMulNBits' arithmetic on a faster AVX2 kernel than MLAS's. Both graphs run attention on edgevl's
GroupQueryAttention (kernels/ort_attention.c: ONNX Runtime's kernel for prefill, edgevl's for the decode step). Where
u8 x s8 saturates (the class without VNNI), the library is installed and its products pass a probe, the ONNX Runtime
backend runs that graph: the same results (int8 prefill bit for bit; decode steps and int4 to float rounding) and a
faster decode (benchmarks/RESULTS.md). Int8MatMul also has AVX-512 VNNI kernels (vpdpbusd: the same integers); on
that class without AMX both ops decode faster than MLAS's, so int8 and int4 decoders run decoder_avx2.onnx there too
(EDGEVL_DECODERS_ON_VNNI). Both ops also have AMX kernels for several rows (tdpbusd, the same integers again): with
them int8 and int4 prefill and decode faster than on MLAS's AMX kernels, so AMX machines run decoder_avx2.onnx too.
There int8 vision graphs also run vision_amx.onnx: attention in bf16 on AMX-BF16 tiles (edgevl's MultiHeadAttention),
a per-class precision the export's manifest names and `edgevl doctor` shows, within the vision drift bounds.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

PRECISION_MODE = "session.x64quantprecision"  # ONNX Runtime's u8 x u8 switch; a no-op outside x86

# /proc/cpuinfo flag (x86) -> ISA class, in the order reports print them and the library's EdgevlIsaClasses bits.
# AMX-BF16: the tiles int8 vision attention runs on (vision_amx.onnx).
_X86_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI",
              "amx_int8": "AMX", "amx_bf16": "AMX-BF16"}
# ARM64: (auxiliary vector entry, bit) -> ISA class; the Linux uapi's HWCAP_ASIMD, HWCAP_ASIMDDP, HWCAP2_I8MM.
_AT_HWCAP, _AT_HWCAP2 = 16, 26
_ARM_HWCAPS = {(_AT_HWCAP, 1): "NEON", (_AT_HWCAP, 20): "dot-product", (_AT_HWCAP2, 13): "i8mm"}
ISA_NAMES = (*_X86_FLAGS.values(), *_ARM_HWCAPS.values())


def _is_arm64() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


@functools.cache
def isa_classes() -> tuple[str, ...]:
    """The ISA classes of this CPU that pick edgevl's kernels ("AVX2", "AVX-512 VNNI", "AMX", "NEON", ...);
    empty where the OS does not say (not Linux). x86 asks cpuid through edgevl's library where it is installed (what
    the kernels and MLAS see: under user-mode emulation, qemu, the emulated CPU), else reads /proc/cpuinfo (under
    qemu the host's); ARM64 reads the process's own hardware capabilities."""
    if _is_arm64():
        try:
            getauxval = ctypes.CDLL(None).getauxval
        except (OSError, AttributeError):
            return ()
        getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
        return tuple(name for (entry, bit), name in _ARM_HWCAPS.items() if getauxval(entry) >> bit & 1)
    cpuid = _cpuid_classes()
    return cpuid if cpuid is not None else _cpuinfo_classes()


def _cpuid_classes() -> tuple[str, ...] | None:
    """x86: cpuid's classes through edgevl's library (EdgevlIsaClasses); None without it, or with one built before
    it said."""
    library = _library_file()
    if library is None:
        return None
    try:
        found = ctypes.CDLL(str(library)).EdgevlIsaClasses()
    except (OSError, AttributeError):
        return None
    return tuple(name for bit, name in enumerate(_X86_FLAGS.values()) if found >> bit & 1)


def _cpuinfo_classes() -> tuple[str, ...]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.partition(":")[2].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ()
    return tuple(name for flag, name in _X86_FLAGS.items() if flag in flags)


def _mlas_kernel(isa: tuple[str, ...]) -> str:
    """MLAS's u8 x s8 kernel for these ISA classes (its own dispatch order: AMX, AVX-512 VNNI, AVX-VNNI, ...)."""
    if _is_arm64():
        return "NEON i8mm" if "i8mm" in isa else "NEON dot-product" if "dot-product" in isa else "NEON"
    for name in ("AMX", "AVX-512 VNNI", "AVX-VNNI"):
        if name in isa:
            return name
    return "AVX-512 (vpmaddubsw)" if "AVX-512" in isa else "AVX2 (vpmaddubsw)" if "AVX2" in isa else "SSE"


_OPS_PROBE_WRONG = "; edgevl's Int8MatMul / Int4MatMul are installed but a probe product was wrong, so not used"


@dataclass(frozen=True)
class IntegerGemm:
    kernel: str  # MLAS's u8 x s8 kernel by this CPU's flags, e.g. "AVX-512 VNNI"
    u8s8_exact: bool  # a full-range u8 x s8 product comes out exact with ONNX Runtime's defaults
    precision_mode: bool  # edgevl sets session.x64quantprecision (u8 x u8 kernels) on its sessions
    exact: bool  # with edgevl's session options, the product is exact: int8 graphs are computed as exported
    # edgevl's Int8MatMul / Int4MatMul passed their probe here (True) or not (False); None: not installed, or a class
    # whose decoders keep ONNX Runtime's kernels (AVX-VNNI, ARM), so not probed
    edgevl_matmul: bool | None = None
    # the decoder precisions that run on those ops here (an export's decoder_avx2.onnx): "int8" and "int4" where
    # u8 x s8 saturates, on AVX-512 VNNI and on AMX (EDGEVL_DECODERS_ON_VNNI)
    edgevl_decoders: tuple[str, ...] = ()
    edgevl_kernel: str | None = None  # the kernels Int8MatMul takes here (int8_matmul_kernel); None: not installed
    # "AMX-BF16": int8 vision graphs run an export's vision_amx.onnx here, attention in bf16 on edgevl's
    # MultiHeadAttention (attention_tiles); None: vision.onnx, attention fp32 on ONNX Runtime's
    vision_attention: str | None = None

    def describe(self) -> str:
        text = self._describe_gemm()
        if self.vision_attention:
            text += (f"; int8 vision attention in bf16 on edgevl's MultiHeadAttention ({self.vision_attention} "
                     "tiles)")
        return text

    def _describe_gemm(self) -> str:
        if self.u8s8_exact:
            text = f"u8 x s8 on {self.kernel}: exact"
            if self.edgevl_decoders:
                return text + self._edgevl_ops()
            return text + (_OPS_PROBE_WRONG if self.edgevl_matmul is False else "")
        if not self.exact:
            return f"u8 x s8 saturates here, and {PRECISION_MODE} did not make it exact: int8 exports are refused"
        text = (f"u8 x s8 saturates int16 pair sums here (x86 without VNNI), so int8 weights run on ONNX Runtime's "
                f"u8 x u8 kernels ({PRECISION_MODE}): exact")
        if self.edgevl_matmul:
            return text + self._edgevl_ops()
        if self.edgevl_matmul is None:
            return text + ("; edgevl's faster Int8MatMul / Int4MatMul are not installed (x86-64, a C compiler at "
                           "install) or this CPU has no AVX2 and FMA")
        return text + _OPS_PROBE_WRONG

    def _edgevl_ops(self) -> str:
        # a library that does not name its kernels predates the VNNI ones: AVX2
        kernel = self.edgevl_kernel or "avx2"
        ops = {"int8": f"Int8MatMul ({kernel} kernels)", "int4": f"Int4MatMul ({kernel} kernels)"}
        return (f"; {' and '.join(self.edgevl_decoders)} decoders on edgevl's "
                f"{' / '.join(ops[p] for p in self.edgevl_decoders)} and GroupQueryAttention: the same results, a "
                "faster decode")

    def to_dict(self) -> dict:
        return {**asdict(self), "description": self.describe()}


PROBE_MODEL = Path(__file__).with_name("data") / "u8s8_probe.onnx"  # MatMulInteger(a, W, 128), W = probe_operands()[1]
# y8 = edgevl.Int8MatMul(x8, W, ones, per_token=0): x8 = float(a - 128) spans -128..127, so it quantizes to a's codes
# exactly; y4 = edgevl.Int4MatMul(x4, codes, ones, K=128, N=96, block_size=128) with int4_probe_operands()
MATMUL_PROBE_MODEL = PROBE_MODEL.with_name("matmul_probe.onnx")


def probe_operands():
    """u8 activations x s8 weights spanning both full ranges, with a row and columns that saturate any int16
    pair sum (255 * 127 * 2), and their exact int64 product with the activations' zero point 128. A formula, not
    random numbers, so PROBE_MODEL's constant weights can be checked against it (tests/test_cpu.py)."""
    import numpy as np

    m, k, n = np.arange(4)[:, None], np.arange(128)[:, None], np.arange(96)[None, :]
    a = ((m * 97 + k.T * 31 + 7) % 256).astype(np.uint8)
    w = ((k * 53 + n * 29 + 11) % 255 - 127).astype(np.int8)
    a[0], w[:, 0], w[:, 1] = 255, 127, -127
    return a, w, (a.astype(np.int64) - 128) @ w.astype(np.int64)


def int4_probe_operands():
    """Int4MatMul's probe: activations -127..127 with 127 in every row (so each row quantizes to itself: scale 1),
    4-bit codes spanning 0..15 (value code - 8) in MatMulNBits' layout [96, 1, 64], and their exact product."""
    import numpy as np

    a, _, _ = probe_operands()
    x = np.clip(a.astype(np.int64) - 128, -127, 127)
    x[:, 0] = 127
    n, k = np.arange(96)[:, None], np.arange(128)[None, :]
    codes = ((k * 53 + n * 29 + 11) % 16).astype(np.uint8)
    codes[0], codes[1] = 15, 0
    packed = (codes[:, 0::2] | codes[:, 1::2] << 4).reshape(96, 1, 64)
    return x, packed, x @ (codes.astype(np.int64) - 8).T


def _product_is_exact(precision_mode: bool) -> bool:
    import numpy as np
    import onnxruntime as ort

    a, _, exact = probe_operands()
    options = ort.SessionOptions()
    options.add_session_config_entry(PRECISION_MODE, "1" if precision_mode else "0")
    session = ort.InferenceSession(str(PROBE_MODEL), options, providers=["CPUExecutionProvider"])
    return bool(np.array_equal(session.run(None, {"a": a})[0], exact))


def _library_file() -> Path | None:
    """edgevl's custom-op library as installed (kernels/ort_ops.c, built on x86-64), whatever this CPU runs."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("edgevl.kernels._ort_ops")
    except ModuleNotFoundError:  # edgevl.kernels itself is not there (edgevl/ alone on the path)
        return None
    return Path(spec.origin) if spec is not None and spec.origin else None


@functools.cache
def matmul_library() -> Path | None:
    """edgevl's ops for ONNX Runtime: Int8MatMul, Int4MatMul and GroupQueryAttention (kernels/ort_ops.c, built with
    the package on x86-64), or None where this install has none (another architecture, or no C compiler when it was
    installed) or this CPU has no AVX2 and FMA."""
    library = _library_file()
    return library if library is not None and "AVX2" in isa_classes() else None


# "avx2", "avx512-vnni" or "amx": the Int8MatMul / Int4MatMul kernels, where not the widest this CPU runs
MATMUL_KERNEL_ENV = "EDGEVL_MATMUL_KERNEL"


@functools.cache
def int8_matmul_kernels() -> tuple[str, ...]:
    """The kernels edgevl's Int8MatMul can run on this CPU ("avx2", "avx512-vnni", "amx"), as the library's own cpuid
    check finds them (under qemu, the emulated CPU's); empty without the library, or with one built before it said
    (an editable install's stale build: `pip install -e .` rebuilds it)."""
    library = matmul_library()
    try:
        found = ctypes.CDLL(str(library)).EdgevlInt8MatMulKernels() if library is not None else 0
    except AttributeError:
        return ()
    return tuple(name for bit, name in ((1, "avx2"), (2, "avx512-vnni"), (4, "amx")) if found & bit)


def attention_tiles() -> bool:
    """Whether edgevl's MultiHeadAttention runs on AMX-BF16 tiles here (the library's own check: the instructions,
    Linux's leave to use the tile state, EDGEVL_MATMUL_KERNEL unset or "amx", as the op reads it when a session is
    built); False without the library."""
    library = matmul_library()
    try:
        return library is not None and bool(ctypes.CDLL(str(library)).EdgevlAttentionTiles())
    except AttributeError:  # a library built before it had the op
        return False


def int8_matmul_kernel() -> str | None:
    """The kernels Int8MatMul takes here: EDGEVL_MATMUL_KERNEL's where set, else the widest this CPU runs."""
    kernels = int8_matmul_kernels()
    return os.environ.get(MATMUL_KERNEL_ENV) or (kernels[-1] if kernels else None)


def matmul_probe_feeds() -> tuple[dict, dict]:
    """MATMUL_PROBE_MODEL's inputs and exact outputs: the probe operands' 4 rows repeated to 36, so the ops' kernels
    for several rows run a whole block of 32 rows and a part of one (the AMX and VNNI panel kernels')."""
    import numpy as np

    a, _, exact8 = probe_operands()
    x4, _, exact4 = int4_probe_operands()
    tile = lambda v: np.tile(v, (9, 1))  # noqa: E731
    return ({"x8": tile(a.astype(np.float32) - 128), "x4": tile(x4.astype(np.float32))},
            {"y8": tile(exact8), "y4": tile(exact4)})


def _edgevl_matmul_is_exact(library: Path) -> bool:
    """Both ops' probe products (MATMUL_PROBE_MODEL); False also where the library does not load or run (reported
    by IntegerGemm.describe, then not used)."""
    import numpy as np
    import onnxruntime as ort

    feeds, exact = matmul_probe_feeds()
    options = ort.SessionOptions()
    try:
        options.register_custom_ops_library(str(library))
        session = ort.InferenceSession(str(MATMUL_PROBE_MODEL), options, providers=["CPUExecutionProvider"])
        outputs = session.run(list(exact), feeds)
    except Exception:  # OSError, or one of ONNX Runtime's error classes (which derive from Exception only)
        return False
    return all(np.array_equal(y, e) for y, e in zip(outputs, exact.values()))


def checked_matmul_library() -> Path:
    """edgevl's Int8MatMul / Int4MatMul library where its probe products come out exact on this CPU, for a caller that
    asks for those ops whatever this CPU's choice (OnnxRuntimeBackend(edgevl_ops=True)); a RuntimeError says why not."""
    library = matmul_library()
    if library is None:
        raise RuntimeError("edgevl's Int8MatMul / Int4MatMul are not installed here: they need x86-64 with AVX2 and "
                           "FMA, and a C compiler when edgevl was installed (pip install -e . builds them)")
    if not _edgevl_matmul_is_exact(library):
        raise RuntimeError(f"edgevl's Int8MatMul / Int4MatMul ({library}) computed a probe product wrong on this CPU")
    return library


# Where u8 x s8 is exact, the decoder precisions whose graphs run on edgevl's ops anyway, by MLAS's kernel, each with
# the kernels (EDGEVL_MATMUL_KERNEL's names; None: any) it needs for that. On AVX-512 VNNI without AMX Int8MatMul's VNNI
# kernels decode faster than MLAS's chain of six nodes a matmul and prefill as fast, and Int4MatMul (its one-row
# tasks) decodes and prefills faster than MatMulNBits. On AMX both ops' AMX kernels (several rows on tiles) prefill
# faster than MLAS's AMX GEMM and MatMulNBits, and their one-row kernels decode faster (benchmarks/RESULTS.md,
# "Int8MatMul on AVX-512 VNNI", "Int4MatMul on AVX-512 VNNI" and "Int8MatMul and Int4MatMul on AMX").
EDGEVL_DECODERS_ON_VNNI = {"AVX-512 VNNI": {"int8": "avx512-vnni", "int4": None}, "AMX": {"int8": "amx", "int4": "amx"}}


@functools.cache
def integer_gemm() -> IntegerGemm:
    """How ONNX Runtime computes u8 x s8 here, measured once per process (two or three tiny sessions, a few ms), and
    which decoders run on edgevl's own ops."""
    kernel = _mlas_kernel(isa_classes())
    library, edgevl_kernel = matmul_library(), int8_matmul_kernel()
    if kernel == "AMX" and int8_matmul_kernels() and "amx" not in int8_matmul_kernels():
        # The CPU has AMX, but Linux refused this process the tile state (arch_prctl ARCH_REQ_XCOMP_PERM, as the ops'
        # own check found: a kernel before 5.16, a seccomp filter). MLAS asks the same and then takes its AVX-512
        # VNNI kernels, so the decoders' choice is that class's.
        kernel = "AVX-512 VNNI"
    # int8 vision attention in bf16 on AMX tiles: 2.8x ONNX Runtime's fp32 kernel on an InternViT-300M layer
    # (benchmarks/RESULTS.md, "Vision attention on AMX-BF16 tiles"); the vision graphs' drift bounds hold.
    vision = "AMX-BF16" if attention_tiles() else None
    if _product_is_exact(precision_mode=False):
        decoders = tuple(p for p, needs in EDGEVL_DECODERS_ON_VNNI.get(kernel, {}).items()
                         if needs in (None, edgevl_kernel))
        if not decoders or library is None:
            return IntegerGemm(kernel, u8s8_exact=True, precision_mode=False, exact=True, edgevl_kernel=edgevl_kernel,
                               vision_attention=vision)
        exact = _edgevl_matmul_is_exact(library)
        return IntegerGemm(kernel, u8s8_exact=True, precision_mode=False, exact=True, edgevl_matmul=exact,
                           edgevl_decoders=decoders if exact else (), edgevl_kernel=edgevl_kernel,
                           vision_attention=vision)
    exact = None if library is None else _edgevl_matmul_is_exact(library)
    return IntegerGemm(kernel, u8s8_exact=False, precision_mode=True, exact=_product_is_exact(precision_mode=True),
                       edgevl_matmul=exact, edgevl_decoders=("int8", "int4") if exact else (),
                       edgevl_kernel=edgevl_kernel, vision_attention=vision)


def configure_session(options) -> None:
    """Set on an onnxruntime.SessionOptions what makes int8 graphs exact on this CPU (nothing where they are)."""
    if integer_gemm().precision_mode:
        options.add_session_config_entry(PRECISION_MODE, "1")


def describe() -> dict:
    """This CPU for a report or a manifest: {"isa": [...], "integer_gemm": IntegerGemm.to_dict()}."""
    return {"isa": list(isa_classes()), "integer_gemm": integer_gemm().to_dict()}


def process_memory_bytes(field: str = "VmHWM") -> int | None:
    """This process's resident memory from /proc/self/status (Linux): "VmHWM" its peak, "VmRSS" now; None where
    there is no such field."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
