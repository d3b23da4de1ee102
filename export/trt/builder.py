"""The TensorRT calls of `edgevl build`: parse an ONNX graph, add the optimization profiles, build a strongly
typed plan. Everything decided before this point (precision, profiles) is data from config.py."""
from __future__ import annotations

import time
from pathlib import Path

from edgevl.manifest import Profile


class BuildError(RuntimeError):
    """TensorRT could not parse or build a graph; the message carries its errors."""


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise ImportError(f"edgevl build needs TensorRT and an NVIDIA GPU ({e}): pip install 'edgevl[gpu]' "
                          "(on Jetson TensorRT comes with JetPack: apt install python3-libnvinfer); "
                          "`edgevl doctor` shows what this machine has") from None
    return tensorrt


def network_flags(trt) -> int:
    # Strongly typed: TensorRT takes every tensor's type from the ONNX graph. TensorRT 11 is always strongly typed
    # (the flag may be gone there), 10.x needs it asked for.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def check_profiles_cover_inputs(profiles: list[Profile], input_names: list[str]) -> None:
    for profile in profiles:
        missing, extra = set(input_names) - set(profile.shapes), set(profile.shapes) - set(input_names)
        if missing or extra:
            raise BuildError(f"profile {profile.name}: no shapes for inputs {sorted(missing)}; shapes for unknown "
                             f"inputs {sorted(extra)} (the ONNX graph and the export manifest disagree)")


def _progress_monitor(trt, log):
    if not hasattr(trt, "IProgressMonitor"):  # TensorRT < 10
        return None

    class Progress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                log(f"[build]   {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            pass

    return Progress()


def build_plan(onnx_path: Path, plan_path: Path, profiles: list[Profile], workspace_bytes: int,
               timing_cache: Path | None, log=print) -> float:
    """Build one plan; returns the build time in seconds. The timing cache is read if present and written back,
    so a second build (another precision, a rebuild) skips kernel timing."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from a file, so external weight data is found
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT could not parse {onnx_path.name}:\n  {errors}")
    check_profiles_cover_inputs(profiles, [network.get_input(i).name for i in range(network.num_inputs)])
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes.items():
            trt_profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(trt_profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    monitor = _progress_monitor(trt, log)
    if monitor is not None:
        config.progress_monitor = monitor
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        raise BuildError(f"TensorRT could not build {onnx_path.name} (see its log above; a larger --workspace-gb "
                         "helps when tactics were skipped for memory)")
    plan_path.write_bytes(bytes(plan))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return seconds
