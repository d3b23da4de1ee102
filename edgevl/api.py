"""EdgeVL: the user-facing pipeline. tiling -> vision -> prompt -> splice -> decode, on any backend."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .generation import DecodeRun, GenerationConfig
from .preprocess import preprocess_image
from .prompts import (IMG_CONTEXT, PromptError, build_query, checkpoint_system_message, get_template, render_prompt,
                      tokenize_prompt)
from .specs import ModelSpec
from .tokenizer import Tokenizer

BACKENDS = ("torch",)


@dataclass
class Timings:
    preprocess_ms: float = 0.0  # tiling + normalisation + tokenization
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    time_to_first_token_ms: float = 0.0  # from the call to the first token, everything included
    decode_ms: float = 0.0
    decode_tokens_per_s: float = 0.0


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stop_reason: str
    prompt_tokens: int
    tiles_per_image: list[int]
    timings: Timings = field(default_factory=Timings)


@dataclass
class _Turn:
    query: str  # with <image> placeholders
    answer: str
    image_embeds: list[np.ndarray]  # [tiles, 256, H] per image of this turn


@dataclass
class _Prepared:
    start: float
    config: GenerationConfig
    query: str
    prompt_ids: np.ndarray
    inputs_embeds: np.ndarray
    image_embeds: list[np.ndarray]
    tiles_per_image: list[int]
    timings: Timings
    history: list[_Turn] | tuple


def _as_list(images) -> list:
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


class EdgeVL:
    def __init__(self, backend, spec: ModelSpec, tokenizer: Tokenizer, template: str | None = None,
                 system_message: str | None = None):
        self.backend, self.spec, self.tokenizer = backend, spec, tokenizer
        self.template = get_template(template or spec.template)
        self.system_message = system_message
        self.history: list[_Turn] = []
        self.last_result: GenerationResult | None = None
        self._image_context_id = tokenizer.token_to_id(IMG_CONTEXT)
        stops = [tokenizer.token_to_id(self.template.stop_token)]
        if tokenizer.eos_token_id is not None:
            stops.append(tokenizer.eos_token_id)
        self.stop_token_ids = tuple(dict.fromkeys(stops))

    @classmethod
    def from_pretrained(cls, path, backend: str = "torch", device: str = "cpu", dtype: str = "float32",
                        max_seq: int | None = None, template: str | None = None,
                        system_message: str | None = None) -> "EdgeVL":
        """Load a local checkpoint directory (InternVL's original format or transformers' -hf format)."""
        from .checkpoint import load_checkpoint
        from .tokenizer import load_tokenizer

        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
        checkpoint = load_checkpoint(path)
        tokenizer = load_tokenizer(Path(path))
        try:
            from .backends.torch_backend import TorchBackend
        except ImportError as e:
            raise ImportError(f"backend='torch' needs PyTorch ({e}): pip install 'edgevl[torch]'") from None
        runtime = TorchBackend(checkpoint, device=device, dtype=dtype, max_seq=max_seq)
        template = template or checkpoint.spec.template
        system_message = system_message or checkpoint_system_message(path, template)
        return cls(runtime, checkpoint.spec, tokenizer, template, system_message)

    # -- one call ----------------------------------------------------------------------------------------

    def generate(self, prompt: str, images=None, *, channel_order: str = "RGB", **generation) -> GenerationResult:
        """Answer `prompt` about `images` (a path, PIL image, HWC uint8 array, or a list of them).

        generation: GenerationConfig fields (max_new_tokens, do_sample, temperature, top_k, top_p,
        repetition_penalty, seed, stop_token_ids, stop_strings)."""
        for _ in self._decode(self._prepare(prompt, images, channel_order, generation, history=())):
            pass
        return self.last_result

    def stream(self, prompt: str, images=None, *, channel_order: str = "RGB", **generation) -> Iterator[str]:
        """Like generate(), yielding text as it is decoded; `last_result` holds the result afterwards.
        Bad input raises here, before the first piece is asked for."""
        return self._decode(self._prepare(prompt, images, channel_order, generation, history=()))

    def chat(self, prompt: str, images=None, *, channel_order: str = "RGB", **generation) -> GenerationResult:
        """generate() with the conversation so far as history; images of earlier turns are not re-encoded."""
        for _ in self._decode(self._prepare(prompt, images, channel_order, generation, history=self.history)):
            pass
        return self.last_result

    def reset_chat(self) -> None:
        self.history = []

    # -- the pipeline ------------------------------------------------------------------------------------

    def _prepare(self, prompt, images, channel_order, generation, history) -> "_Prepared":
        start = time.perf_counter()
        config = self._generation_config(generation)
        images = _as_list(images)
        query = build_query(prompt, len(images))
        pixel_values = [preprocess_image(im, self.spec.tiling, channel_order) for im in images]
        past_embeds = [e for turn in history for e in turn.image_embeds]
        tiles = [e.shape[0] for e in past_embeds] + [p.shape[0] for p in pixel_values]
        text = render_prompt(self.template, query, [(t.query, t.answer) for t in history], self.system_message)
        prompt_ids = tokenize_prompt(self.tokenizer, text, tiles, self.spec.image_tokens_per_tile)
        if len(prompt_ids) >= self.backend.max_seq:
            raise PromptError(f"the prompt is {len(prompt_ids)} tokens ({sum(tiles)} image tiles), but the model "
                              f"holds {self.backend.max_seq}: use fewer or smaller images, or a larger max_seq")
        timings = Timings(preprocess_ms=_ms_since(start))
        t = time.perf_counter()
        new_embeds = [self.backend.encode_images(p) for p in pixel_values]
        timings.vision_ms = _ms_since(t)
        inputs_embeds = self._splice(prompt_ids, past_embeds + new_embeds)
        return _Prepared(start, config, query, prompt_ids, inputs_embeds, new_embeds,
                         [p.shape[0] for p in pixel_values], timings, history)

    def _decode(self, prep: "_Prepared") -> Iterator[str]:
        before_decode_ms = _ms_since(prep.start)
        run = DecodeRun(self.backend, prep.inputs_embeds, prep.prompt_ids, self.tokenizer, prep.config)
        yield from run
        timings = prep.timings
        timings.prefill_ms, timings.decode_ms = run.prefill_ms, run.decode_ms
        timings.time_to_first_token_ms = before_decode_ms + run.time_to_first_token_ms
        timings.decode_tokens_per_s = run.decode_tokens_per_s
        self.last_result = GenerationResult(run.text, list(run.token_ids), run.stop_reason, len(prep.prompt_ids),
                                            prep.tiles_per_image, timings)
        if prep.history is self.history:
            self.history.append(_Turn(prep.query, run.text, prep.image_embeds))

    def _generation_config(self, generation: dict) -> GenerationConfig:
        stops = tuple(generation.pop("stop_token_ids", ())) + self.stop_token_ids
        return GenerationConfig(stop_token_ids=tuple(dict.fromkeys(stops)), **generation)

    def _splice(self, prompt_ids: np.ndarray, image_embeds: list[np.ndarray]) -> np.ndarray:
        """Token embeddings with each IMG_CONTEXT row replaced by the image features, in order."""
        embeds = self.backend.embed_tokens(prompt_ids)
        slots = prompt_ids == self._image_context_id
        features = (np.concatenate([e.reshape(-1, e.shape[-1]) for e in image_embeds])
                    if image_embeds else np.zeros((0, embeds.shape[1]), np.float32))
        if slots.sum() != len(features):  # tokenize_prompt guarantees this; a mismatch is a bug, not bad input
            raise AssertionError(f"{slots.sum()} image slots in the prompt but {len(features)} image features")
        embeds[slots] = features
        return embeds


def _ms_since(t: float) -> float:
    return (time.perf_counter() - t) * 1e3
