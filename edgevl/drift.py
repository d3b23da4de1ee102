"""Drift of one model against another (quantized vs fp32, a device backend vs the reference): image-embedding
cosine, next-token logits, greedy-token agreement. Torch-free: export, selftest and benchmarks share it."""
from __future__ import annotations

import numpy as np

from .preprocess import preprocess_image
from .synthetic import synthetic_image


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


DRIFT_PROMPTS = ("Describe this image in detail.", "What objects are in the picture?",
                 "Is there any text in the image? Read it.", "What colours dominate the scene?")


def greedy_agreement(reference_ids, candidate_ids) -> float:
    """Fraction of the reference answer reproduced before the first differing token (after it the contexts
    differ, so later matches prove nothing)."""
    same = next((k for k, (x, y) in enumerate(zip(reference_ids, candidate_ids)) if x != y),
                min(len(reference_ids), len(candidate_ids)))
    return same / max(len(reference_ids), 1)


def measure_drift(reference, candidate, new_tokens: int = 32) -> dict:
    """Image-embedding cosine, next-token logits cosine / top-1 agreement and greedy-token agreement of
    `candidate` against `reference` (two EdgeVL models), on fixed synthetic images and prompts."""
    expected = drift_outputs(reference, new_tokens)
    return compare_drift(expected, drift_outputs(candidate, new_tokens, inputs_from=expected))


def drift_outputs(model, new_tokens: int = 32, inputs_from: dict | None = None) -> dict:
    """What measure_drift compares, from one EdgeVL model: image embeddings of fixed synthetic images (1 and 3
    tiles), next-token logits of DRIFT_PROMPTS and greedy answers. `inputs_from`, the reference's outputs, gives
    the candidate the reference's exact inputs (pixel values, prompt embeddings), so the two models can be loaded
    one after the other rather than side by side."""
    images = [synthetic_image(w, h, seed=500 + i) for i, (w, h) in enumerate([(448, 448), (448, 896)])]
    if inputs_from is None:
        pixel_values = [preprocess_image(image, model.spec.tiling) for image in images]
        # Next-token distributions on the same context: robust to the divergence of greedy answers.
        prompt_embeds = [model.backend.embed_tokens(np.array(model.tokenizer.encode(p))) for p in DRIFT_PROMPTS]
    else:
        pixel_values, prompt_embeds = inputs_from["pixel_values"], inputs_from["prompt_embeds"]
    return {"pixel_values": pixel_values, "prompt_embeds": prompt_embeds,
            "image_embeds": [model.backend.encode_images(p) for p in pixel_values],
            "next_token_logits": [model.backend.prefill(e) for e in prompt_embeds],
            "answers": [model.generate(prompt, images[i % len(images)], max_new_tokens=new_tokens).token_ids
                        for i, prompt in enumerate(DRIFT_PROMPTS)],
            "new_tokens": new_tokens}


def compare_drift(reference: dict, candidate: dict) -> dict:
    """measure_drift's figures from two drift_outputs."""
    cosines = [cosine(r, c) for ref, cand in zip(reference["image_embeds"], candidate["image_embeds"])
               for r, c in zip(ref, cand)]
    logits = list(zip(reference["next_token_logits"], candidate["next_token_logits"]))
    agreement = [greedy_agreement(a, b) for a, b in zip(reference["answers"], candidate["answers"])]
    return {"image_embeds_cosine_min": min(cosines), "image_embeds_cosine_mean": float(np.mean(cosines)),
            "greedy_token_agreement": float(np.mean(agreement)), "new_tokens": reference["new_tokens"],
            "next_token_logits_cosine_min": min(cosine(r, c) for r, c in logits),
            "next_token_top1_agreement": float(np.mean([float(np.argmax(r) == np.argmax(c)) for r, c in logits])),
            "prompts": len(DRIFT_PROMPTS)}


def format_drift(drift: dict) -> str:
    return (f"image-embedding cosine min {drift['image_embeds_cosine_min']:.4f} "
            f"(mean {drift['image_embeds_cosine_mean']:.4f}); next-token logits cosine min "
            f"{drift['next_token_logits_cosine_min']:.4f}, top-1 agreement {drift['next_token_top1_agreement']:.2f}; "
            f"greedy-token agreement {drift['greedy_token_agreement']:.2f} over {drift['prompts']} prompts x "
            f"{drift['new_tokens']} tokens")
