"""Parity with the reference: transformers' InternVLForConditionalGeneration on the same random weights.

edgevl loads the original-format checkpoint; transformers loads the -hf one written from the same weights.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgevl import EdgeVL
from edgevl.preprocess import preprocess_image
from edgevl.prompts import IMG_CONTEXT, build_query, render_prompt, tokenize_prompt
from edgevl.synthetic import synthetic_image

transformers = pytest.importorskip("transformers")

FAMILIES = ["qwen2", "internlm2", "phi3"]
FEATURE_ATOL = 1e-4  # fp32, different op order (fused qkv, SDPA); measured max diffs are ~1e-6
LOGITS_ATOL = 1e-3  # logits are O(10) here


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tiny_checkpoint):
    family = request.param
    ours = EdgeVL.from_pretrained(tiny_checkpoint(family, "original"))
    reference = transformers.InternVLForConditionalGeneration.from_pretrained(tiny_checkpoint(family, "hf")).eval()
    return ours, reference


def _inputs(model: EdgeVL, images, question="Describe the image in detail."):
    pixel_values = [preprocess_image(im, model.spec.tiling) for im in images]
    prompt = render_prompt(model.template, build_query(question, len(images)))
    ids = tokenize_prompt(model.tokenizer, prompt, [p.shape[0] for p in pixel_values])
    return ids, pixel_values


def test_image_features(pair):
    ours, reference = pair
    pixel_values = preprocess_image(synthetic_image(900, 500), ours.spec.tiling)
    assert pixel_values.shape == (3, 3, 448, 448)  # 2x1 grid + thumbnail
    mine = ours.backend.encode_images(pixel_values)
    with torch.no_grad():
        ref = reference.model.get_image_features(torch.from_numpy(pixel_values)).pooler_output.numpy()
    assert mine.shape == ref.shape == (3, 256, 64)
    np.testing.assert_allclose(mine, ref, atol=FEATURE_ATOL, rtol=0)


def test_logits_on_image_and_text_prompt(pair):
    ours, reference = pair
    ids, pixel_values = _inputs(ours, [synthetic_image(600, 600)])
    embeds = ours.backend.embed_tokens(ids)
    embeds[ids == ours.tokenizer.token_to_id(IMG_CONTEXT)] = ours.backend.encode_images(pixel_values[0]).reshape(
        -1, embeds.shape[1])
    with torch.no_grad():
        mine, _ = ours.backend.lm(torch.from_numpy(embeds)[None], torch.arange(len(ids))[None],
                                  ours.backend.lm.empty_cache(), last_only=False)
        ref = reference(input_ids=torch.from_numpy(ids)[None],
                        pixel_values=torch.from_numpy(pixel_values[0])).logits
    assert mine.shape == ref.shape and mine.shape[1] == len(ids) > 256
    np.testing.assert_allclose(mine.numpy(), ref.numpy(), atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("sizes", [[(640, 480)], [(300, 700), (1000, 400)]], ids=["one-image", "two-images"])
def test_greedy_tokens(pair, sizes):
    ours, reference = pair
    images = [synthetic_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    result = ours.generate("What is in the picture?", images if len(images) > 1 else images[0],
                           max_new_tokens=24)
    ids, pixel_values = _inputs(ours, images, "What is in the picture?")
    assert result.prompt_tokens == len(ids)
    with torch.no_grad():
        out = reference.generate(input_ids=torch.from_numpy(ids)[None],
                                 pixel_values=torch.from_numpy(np.concatenate(pixel_values)),
                                 max_new_tokens=24, do_sample=False, eos_token_id=list(ours.stop_token_ids),
                                 pad_token_id=ours.stop_token_ids[0])[0, len(ids):].tolist()
    if out[-1] in ours.stop_token_ids:  # transformers keeps the stop token; edgevl reports it as stop_reason
        out = out[:-1]
        assert result.stop_reason == "stop_token"
    assert len(result.token_ids) >= 16, "the random model stopped too early for the check to mean anything"
    assert result.token_ids == out


@pytest.mark.parametrize("family", FAMILIES)
def test_original_and_hf_formats_generate_the_same(tiny_checkpoint, family):
    image = synthetic_image(500, 900)
    a = EdgeVL.from_pretrained(tiny_checkpoint(family, "original")).generate("Hi <image> there", image,
                                                                                 max_new_tokens=16)
    b = EdgeVL.from_pretrained(tiny_checkpoint(family, "hf")).generate("Hi <image> there", image, max_new_tokens=16)
    assert a.token_ids == b.token_ids and a.text == b.text


def test_pixel_shuffle_v1_is_the_transposed_token_order(tiny_checkpoint):
    """InternVL's v1 pixel shuffle omits the final permute: its 16x16 token grid is v2's transposed."""
    pixel_values = preprocess_image(synthetic_image(448, 448), EdgeVL.from_pretrained(
        tiny_checkpoint("qwen2")).spec.tiling)
    v2 = EdgeVL.from_pretrained(tiny_checkpoint("qwen2")).backend.encode_images(pixel_values)
    v1 = EdgeVL.from_pretrained(tiny_checkpoint("qwen2", ps_version="v1")).backend.encode_images(pixel_values)
    grid = lambda x: x.reshape(x.shape[0], 16, 16, -1)  # noqa: E731
    np.testing.assert_allclose(grid(v1), grid(v2).transpose(0, 2, 1, 3), atol=1e-5)
    assert not np.allclose(v1, v2, atol=1e-3)


def test_bfloat16_runtime_stays_close_to_float32(tiny_checkpoint):
    path = tiny_checkpoint("qwen2")
    pixel_values = preprocess_image(synthetic_image(448, 448), EdgeVL.from_pretrained(path).spec.tiling)
    f32 = EdgeVL.from_pretrained(path).backend.encode_images(pixel_values).ravel()
    bf16 = EdgeVL.from_pretrained(path, dtype="bfloat16").backend.encode_images(pixel_values).ravel()
    cosine = f32 @ bf16 / np.linalg.norm(f32) / np.linalg.norm(bf16)
    assert cosine > 0.999


def test_the_reference_imports_from_a_checkouts_root():
    """From the repository's root (`python -m pytest`, `python -m benchmarks`) the top-level kernels/ directory is on
    sys.path ahead of site-packages, under the name of the Hugging Face package transformers imports: it must hand
    over to that package (kernels/__init__.py), or transformers' modeling fails to import."""
    import subprocess
    import sys
    from importlib import metadata
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = "import kernels, transformers.activations; print(kernels.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    try:
        metadata.distribution("kernels")
    except metadata.PackageNotFoundError:
        return  # transformers before 5.25 does not need it, and nothing else is there to hand over to
    assert Path(proc.stdout.strip()).resolve().parent != root / "kernels"
