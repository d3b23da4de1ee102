"""TensorRT plans on a real GPU against the ONNX Runtime fp32 reference on the same tiny random checkpoint.
Skipped, with the reason, on machines without TensorRT or a GPU."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from edgevl import EdgeVL
from edgevl.backends.tensorrt_backend import PlanMismatchError, tensorrt_unavailable_reason
from edgevl.export import export_model
from edgevl.export.trt import build_engines
from edgevl.preprocess import preprocess_image
from edgevl.synthetic import synthetic_image

REASON = tensorrt_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"TensorRT needs an NVIDIA GPU and tensorrt: {REASON}")
EMBED_COSINE = 0.999
NEW_TOKENS = 32


def cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def built(tiny_checkpoint, tmp_path_factory):
    made = {}

    def make(precision: str, kv_cache: str = "concat"):
        if (precision, kv_cache) not in made:
            out = tmp_path_factory.mktemp(f"trt-{precision}-{kv_cache}")
            export_model(tiny_checkpoint("qwen2"), out, max_seq=512, log=lambda _: None)
            reference = EdgeVL.from_pretrained(out, backend="onnxruntime")
            build_engines(out, precision=precision, kv_cache=kv_cache, log=print)
            made[precision, kv_cache] = (reference, out)
        return made[precision, kv_cache]

    return make


@pytest.mark.parametrize("tiles", [1, 3, 7, 13])
def test_fp16_image_embeddings_match_fp32(built, tiles):
    reference, out = built("fp16")
    model = EdgeVL.from_pretrained(out)
    assert type(model.backend).__name__ == "TensorRTBackend"  # chosen by default: plans + GPU present
    pixel_values = preprocess_image(synthetic_image(1400, 1000, seed=3), reference.spec.tiling)[:tiles]
    ref, got = reference.backend.encode_images(pixel_values), model.backend.encode_images(pixel_values)
    assert got.shape == ref.shape
    assert min(cosine(a, b) for a, b in zip(ref, got)) >= EMBED_COSINE


def test_fp16_greedy_tokens_match_fp32(built):
    reference, out = built("fp16")
    model = EdgeVL.from_pretrained(out, backend="tensorrt")
    image = synthetic_image(900, 450, seed=1)
    a = reference.generate("What is in the picture?", image, max_new_tokens=NEW_TOKENS)
    b = model.generate("What is in the picture?", image, max_new_tokens=NEW_TOKENS)
    first = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
    if first is not None:  # allowed only at an fp16 tie: the reference's top two logits nearly equal there
        pytest.fail(f"greedy tokens diverge at {first}: {a.token_ids[:first + 1]} vs {b.token_ids[:first + 1]}")
    report = model.backend.memory_report()
    print("memory", json.dumps(report))
    assert report["kv_cache_bytes"] > 0 and report["device_peak_used_bytes"] > 0


def test_int8_vision_cosine_reported(built):
    reference, out = built("int8-vision-fp16-llm")
    model = EdgeVL.from_pretrained(out, backend="tensorrt")
    pixel_values = preprocess_image(synthetic_image(900, 450, seed=2), reference.spec.tiling)
    ref, got = reference.backend.encode_images(pixel_values), model.backend.encode_images(pixel_values)
    cosines = [cosine(a, b) for a, b in zip(ref, got)]
    print(f"int8 vision cosine vs fp32: min {min(cosines):.4f} mean {np.mean(cosines):.4f}")
    assert min(cosines) >= 0.98  # loose floor on a tiny random model; the real number is reported above


def test_plans_from_another_tensorrt_version_are_refused(built):
    _, out = built("fp16")
    from edgevl.manifest import read_manifest, write_manifest

    manifest = read_manifest(out)
    write_manifest(out, replace(manifest, tensorrt=replace(manifest.tensorrt, version="0.0.1")))
    try:
        with pytest.raises(PlanMismatchError, match="rebuild"):
            EdgeVL.from_pretrained(out, backend="tensorrt")
    finally:
        import tensorrt

        write_manifest(out, manifest)


def _first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_fixed_kv_cache_plans_match_fp32_with_and_without_cuda_graphs(built, cuda_graph):
    reference, out = built("fp16", "fixed")
    model = EdgeVL.from_pretrained(out, backend="tensorrt", cuda_graph=cuda_graph)
    image = synthetic_image(900, 450, seed=1)
    for _ in range(2):  # a second conversation replays the graphs captured in the first
        a = reference.generate("What is in the picture?", image, max_new_tokens=NEW_TOKENS)
        b = model.generate("What is in the picture?", image, max_new_tokens=NEW_TOKENS)
        first = _first_difference(a.token_ids, b.token_ids)
        assert first is None, (f"greedy tokens diverge at {first}: {a.token_ids[:first + 1]} vs "
                               f"{b.token_ids[:first + 1]}")
    if cuda_graph:
        assert sorted(model.backend._graphs) == [0, 1]  # one captured decode step per KV parity
    print(f"cuda_graph={cuda_graph}: decode {b.timings.decode_tokens_per_s:.1f} tokens/s")


def test_cuda_graph_decode_is_bitwise_the_uncaptured_step(built):
    _, out = built("fp16", "fixed")
    plain, graphed = (EdgeVL.from_pretrained(out, backend="tensorrt", cuda_graph=flag).backend
                      for flag in (False, True))
    embeds = plain.embed_tokens(np.arange(40) % 400)
    np.testing.assert_array_equal(plain.prefill(embeds), graphed.prefill(embeds))
    token = 7
    for _ in range(8):  # both parities, captured then replayed
        a, b = plain.decode(token), graphed.decode(token)
        np.testing.assert_array_equal(a, b)
        token = int(np.argmax(a))


def test_cuda_graph_needs_fixed_plans(built):
    _, out = built("fp16")
    with pytest.raises(ValueError, match="--kv-cache fixed"):
        EdgeVL.from_pretrained(out, backend="tensorrt", cuda_graph=True)


@pytest.mark.parametrize("precision", ["int4-llm", "int8-vision-int4-llm"])
def test_int4_decoder_logits_track_fp32(built, precision):
    import tensorrt

    from edgevl.device import gpu_info
    from edgevl.export.trt.config import check_tensorrt_supports

    try:
        check_tensorrt_supports(precision, tensorrt.__version__, gpu_info()["compute_capability"])
    except ValueError as e:
        pytest.skip(str(e))
    reference, out = built(precision)
    model = EdgeVL.from_pretrained(out, backend="tensorrt")
    ids = np.array(reference.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 8))
    a, b = reference.backend.prefill(reference.backend.embed_tokens(ids)), model.backend.prefill(
        model.backend.embed_tokens(ids))
    cosines = []
    for _ in range(16):  # both follow the reference's tokens, so the logits stay comparable
        cosines.append(cosine(a, b))
        token = int(np.argmax(a))
        a, b = reference.backend.decode(token), model.backend.decode(token)
    print(f"{precision} decoder logits cosine vs fp32: min {min(cosines):.4f} mean {np.mean(cosines):.4f}")
    assert min(cosines) >= 0.95  # the CPU check of the same rewrite measured 0.978 on this model
