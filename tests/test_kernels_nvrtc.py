"""Every kernel source compiles through NVRTC (cuda-python; no GPU needed) for the target GPUs."""

import pytest

nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-python (cuda.bindings.nvrtc) is not installed")

from edgevl.kernels.nvrtc_compile import KERNELS, TARGET_ARCHS, compile_source, supported_archs  # noqa: E402


def _arch_or_skip(arch):
    try:
        archs = supported_archs()
    except Exception as e:  # the nvrtc shared library itself may be missing
        pytest.skip(f"NVRTC is not usable here: {e}")
    if arch not in archs:
        if arch in (87, 89):
            pytest.fail(f"this NVRTC does not support sm_{arch} (supports {archs}); CI needs it")
        pytest.skip(f"this NVRTC does not know sm_{arch} (supports {archs})")


@pytest.mark.parametrize("arch", TARGET_ARCHS)
@pytest.mark.parametrize("source", sorted(KERNELS))
@pytest.mark.parametrize("output", ["cubin", "ptx"])
def test_compiles_for_arch(source, arch, output):
    _arch_or_skip(arch)
    binary = compile_source(source, arch, output)
    assert len(binary) > 0
    for name in KERNELS[source]:
        assert name.encode() in binary, f"{name} missing from the {output} of {source} for sm_{arch}"
    if output == "ptx":
        assert f".target sm_{arch}".encode() in binary
