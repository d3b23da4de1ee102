"""EdgeVL: the user-facing pipeline. tiling -> vision -> prompt -> splice -> decode, on any backend."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from .backends import backend_class, backend_entry
from .generation import DecodeRun, GenerationConfig
from .gpu_preprocess import HostPreprocessor, make_preprocessor, resolve_preprocess
from .prompts import (IMG_CONTEXT, PromptError, build_query, checkpoint_system_message, get_template, render_prompt,
                      tokenize_prompt)
from .specs import ModelSpec
from .tokenizer import Tokenizer

@dataclass
class Timings:
    preprocess_ms: float = 0.0  # tiling + normalisation + tokenization
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    time_to_first_token_ms: float = 0.0  # from the call to the first token, everything included
    decode_ms: float = 0.0
    decode_tokens_per_s: float = 0.0
    vision_cache_hits: int = 0  # images of the prompt whose embeddings were reused (chat), not encoded again
    images_encoded: int = 0


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
    image_keys: list[str] = field(default_factory=list)  # content hash per image, for the chat's embedding cache


@dataclass
class _Prepared:
    start: float
    config: GenerationConfig
    query: str
    prompt_ids: np.ndarray
    inputs_embeds: np.ndarray
    image_embeds: list[np.ndarray]
    image_keys: list[str]
    tiles_per_image: list[int]
    timings: Timings
    history: list[_Turn] | tuple


def _as_list(images) -> list:
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


class EdgeVL:
    """A loaded model: generate(), stream() and chat() over one backend.

    One generation at a time: the backend holds one KV cache, so calls from several threads are serialized (each
    waits for the model; a result never mixes two calls). A stream() holds the model from the call until it is
    exhausted, closed (`.close()`, or leaving a `with` block) or garbage-collected: another thread's call waits
    for it, and a second call from the thread that holds an open stream raises RuntimeError, since it would wait
    for itself. Read each call's result from its return value: `last_result` is whichever call finished last."""

    def __init__(self, backend, spec: ModelSpec, tokenizer: Tokenizer, template: str | None = None,
                 system_message: str | None = None, preprocessor=None, allow_special_tokens: bool = False):
        self.backend, self.spec, self.tokenizer = backend, spec, tokenizer
        # False: special tokens typed in prompts, history or the system message are plain text (prompts.TextChunk).
        self.allow_special_tokens = allow_special_tokens
        self.preprocessor = preprocessor or HostPreprocessor()  # see gpu_preprocess: where images are tiled
        self.template = get_template(template or spec.template)
        self.system_message = system_message
        self.history: list[_Turn] = []
        self.last_result: GenerationResult | None = None
        self._image_context_id = tokenizer.token_to_id(IMG_CONTEXT)
        stops = [tokenizer.token_to_id(self.template.stop_token)]
        if tokenizer.eos_token_id is not None:
            stops.append(tokenizer.eos_token_id)
        self.stop_token_ids = tuple(dict.fromkeys(stops))
        self._lock, self._holder = threading.Lock(), None  # the thread running a generation (see the class doc)

    @classmethod
    def from_pretrained(cls, path, backend: str | None = None, device: str | None = None, dtype: str = "float32",
                        max_seq: int | None = None, template: str | None = None,
                        system_message: str | None = None, num_threads: int | None = None,
                        verify_checksums: bool = True, preprocess: str | None = None,
                        cuda_graph: bool = False, allow_special_tokens: bool = False) -> "EdgeVL":
        """Load a local directory: an InternVL checkpoint (original or -hf format; backend "torch") or an
        `edgevl export` directory (backend "onnxruntime", chosen by default when manifest.json is present;
        "tensorrt" instead when `edgevl build` plans are there and tensorrt + a GPU are usable).

        device: "cpu" or "cuda"; None: the backend's default (edgevl.backends.BACKENDS). dtype: torch backend only.
        num_threads: onnxruntime intra-op threads.
        preprocess: where images are tiled, "gpu" (the image goes to the device once, as uint8) or "cpu"; None
        picks "gpu" for backend "tensorrt" and for "onnxruntime" with device="cuda", else "cpu". "gpu" where it
        cannot run raises PreprocessUnavailable (no fallback). cuda_graph: backend "tensorrt" with plans built
        `--kv-cache fixed` only; replays each decode step as a captured CUDA graph (a failed capture raises).
        allow_special_tokens: parse special tokens written in prompts, history and the system message, as InternVL's
        chat() does (`<|im_start|>` opens a turn, `<IMG_CONTEXT>` an image slot); by default they are plain text."""
        from .manifest import is_export_dir
        from .tokenizer import load_tokenizer

        path = Path(path)
        exported = is_export_dir(path)
        if not exported and any(path.glob("*.onnx")):
            from .manifest import ExportError

            raise ExportError(f"{path}: incomplete export (ONNX graphs but no manifest.json: the export was "
                              "interrupted): re-run edgevl export")
        manifest = None
        if exported:
            from .manifest import read_manifest

            manifest = read_manifest(path, verify_checksums=verify_checksums)
        backend = backend or (_default_export_backend(path, manifest) if exported else "torch")
        entry = backend_entry(backend)
        if exported != (entry.loads == "export"):
            raise ValueError(f"{path}: backend={backend!r} runs " + (
                "checkpoint directories; this is an `edgevl export` directory (use backend='onnxruntime')"
                if exported else "`edgevl export` directories; this is a checkpoint (export it first, or use "
                "backend='torch')"))
        if cuda_graph and backend != "tensorrt":
            raise ValueError(f"cuda_graph=True is a TensorRT backend option; backend is {backend!r}")
        device = device or entry.default_device
        preprocess = resolve_preprocess(preprocess, backend, device)
        options = {"torch": {"dtype": dtype}, "onnxruntime": {"num_threads": num_threads},
                   "tensorrt": {"cuda_graph": cuda_graph}}[backend]
        if exported:
            runtime = backend_class(backend)(path, manifest, device=device, max_seq=max_seq, **options)
            spec, stored_message = manifest.spec, manifest.system_message
        else:
            from .checkpoint import load_checkpoint

            checkpoint = load_checkpoint(path)
            runtime = backend_class(backend)(checkpoint, device=device, max_seq=max_seq, **options)
            spec = checkpoint.spec
            stored_message = checkpoint_system_message(path, template or spec.template)
        preprocessor = make_preprocessor(preprocess, runtime, device)
        return cls(runtime, spec, load_tokenizer(path), template, system_message or stored_message, preprocessor,
                   allow_special_tokens=allow_special_tokens)

    # -- one call ----------------------------------------------------------------------------------------

    def generate(self, prompt: str, images=None, *, channel_order: str = "RGB", video=None, num_frames: int = 8,
                 **generation) -> GenerationResult:
        """Answer `prompt` about `images`: a path, PIL image, HWC uint8 array, or a list of them; or a dict
        {camera: image} of the six driving cameras (assembled into one 2688x896 image, 12 tiles + thumbnail,
        camera names in the prompt); or `video` (a file read with OpenCV, `num_frames` frames sampled
        uniformly, one tile each, prompted `Frame1: <image>` ...).

        generation: GenerationConfig fields (max_new_tokens, do_sample, temperature, top_k, top_p,
        repetition_penalty, seed, stop_token_ids, stop_strings)."""
        with self._holding():
            for _ in self._decode(self._prepare(prompt, (images, channel_order, video, num_frames), generation,
                                                history=())):
                pass
            return self.last_result

    def stream(self, prompt: str, images=None, *, channel_order: str = "RGB", video=None, num_frames: int = 8,
               **generation) -> Iterator[str]:
        """Like generate(), yielding text as it is decoded; `last_result` holds the result afterwards.
        Bad input raises here, before the first piece is asked for. The stream holds the model until it is
        exhausted or closed (see the class doc); use it as `with model.stream(...) as pieces:` to close it early."""
        self._acquire()
        try:
            prepared = self._prepare(prompt, (images, channel_order, video, num_frames), generation, history=())
        except BaseException:
            self._release()
            raise
        return _Stream(self._decode(prepared), self._release)

    def chat(self, prompt: str, images=None, *, channel_order: str = "RGB", video=None, num_frames: int = 8,
             **generation) -> GenerationResult:
        """generate() with the conversation so far as history. Images of earlier turns are not re-encoded,
        nor is an image identical to one already encoded in this chat (timings.vision_cache_hits counts both)."""
        with self._holding():
            for _ in self._decode(self._prepare(prompt, (images, channel_order, video, num_frames), generation,
                                                history=self.history)):
                pass
            return self.last_result

    def reset_chat(self) -> None:
        with self._holding():
            self.history = []

    # -- one generation at a time ------------------------------------------------------------------------

    def _acquire(self) -> None:
        if self._holder == threading.get_ident():
            raise RuntimeError("this EdgeVL has an open stream() in this thread: exhaust it or close() it before "
                               "the next call (one generation at a time per model)")
        self._lock.acquire()
        self._holder = threading.get_ident()

    def _release(self) -> None:
        self._holder = None
        self._lock.release()

    @contextmanager
    def _holding(self):
        self._acquire()
        try:
            yield
        finally:
            self._release()

    # -- the pipeline ------------------------------------------------------------------------------------

    def _prepare(self, prompt, visual, generation, history) -> "_Prepared":
        start = time.perf_counter()
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        config = self._generation_config(generation)
        query, pixel_values = self._visual_inputs(prompt, *visual, max_new_tokens=config.max_new_tokens)
        past_embeds = [e for turn in history for e in turn.image_embeds]
        tiles = [e.shape[0] for e in past_embeds] + [p.shape[0] for p in pixel_values]
        text = render_prompt(self.template, query, [(t.query, t.answer) for t in history], self.system_message)
        prompt_ids = tokenize_prompt(self.tokenizer, text, tiles, self.spec.image_tokens_per_tile,
                                     allow_special_tokens=self.allow_special_tokens)
        if len(prompt_ids) >= self.backend.max_seq:
            raise PromptError(f"the prompt is {len(prompt_ids)} tokens ({sum(tiles)} image tiles), but the model "
                              f"holds {self.backend.max_seq}: use fewer or smaller images, or a larger max_seq")
        # Only a chat keeps embeddings; within it, an image seen before (same pixels, same tiling) is reused.
        in_chat = history is self.history
        keys = [self.preprocessor.content_key(p) if in_chat else None for p in pixel_values]
        cache = {k: e for turn in history for k, e in zip(turn.image_keys, turn.image_embeds)}
        timings = Timings(preprocess_ms=_ms_since(start))
        t = time.perf_counter()
        new_embeds = [self._encode(p, key, cache, timings) for p, key in zip(pixel_values, keys)]
        timings.vision_ms = _ms_since(t)
        timings.vision_cache_hits = len(past_embeds) + len(pixel_values) - timings.images_encoded
        inputs_embeds = self._splice(prompt_ids, past_embeds + new_embeds)
        return _Prepared(start, config, query, prompt_ids, inputs_embeds, new_embeds, keys,
                         [p.shape[0] for p in pixel_values], timings, history)

    def _encode(self, pixel_values, key: str | None, cache: dict, timings: Timings) -> np.ndarray:
        if key is not None and key in cache:
            return cache[key]
        timings.images_encoded += 1
        embeds = self.backend.encode_images(pixel_values)
        if key is not None:
            cache[key] = embeds
        return embeds

    def _visual_inputs(self, prompt, images, channel_order, video, num_frames, max_new_tokens):
        """(query with one <image> per image, pixel_values per image) for plain, multi-view and video input."""
        from .formats import driving, video as video_format

        if video is not None:
            if images is not None:
                raise ValueError("pass either images= or video=, not both")
            video_format.check_frame_budget(num_frames, self.backend.max_seq, self.spec.image_tokens_per_tile,
                                            max_new_tokens)
            frames = video_format.read_video_frames(video, num_frames)
            one_tile = replace(self.spec.tiling, min_tiles=1, max_tiles=1, use_thumbnail=False)
            frame_tiles = [self.preprocessor.tile(f, one_tile) for f in frames]
            return video_format.video_query(prompt, len(frames)), frame_tiles
        if isinstance(images, dict):
            twelve = replace(self.spec.tiling, min_tiles=min(self.spec.tiling.min_tiles, 12), max_tiles=12)
            views = self.preprocessor.tile_driving(images, channel_order, twelve)
            return build_query(driving.driving_query(prompt), 1), [views]
        images = _as_list(images)
        query = build_query(prompt, len(images))
        return query, [self.preprocessor.tile(im, self.spec.tiling, channel_order) for im in images]

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
            self.history.append(_Turn(prep.query, run.text, prep.image_embeds, prep.image_keys))

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


class _Stream:
    """stream()'s iterator: text pieces; gives the model back (release) once exhausted, closed or collected."""

    def __init__(self, pieces: Iterator[str], release):
        self._pieces, self._release = pieces, release

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self._release is None:
            raise StopIteration
        try:
            return next(self._pieces)
        except BaseException:  # StopIteration included: the stream is over either way
            self.close()
            raise

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            self._pieces.close()
            release()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


def _default_export_backend(path: Path, manifest) -> str:
    """tensorrt when `edgevl build` left plans here and this machine can run them, else onnxruntime."""
    if manifest.tensorrt:
        from .backends.tensorrt_backend import plans_present, tensorrt_unavailable_reason

        if plans_present(path, manifest) and tensorrt_unavailable_reason() is None:
            return "tensorrt"
    return "onnxruntime"


def _ms_since(t: float) -> float:
    return (time.perf_counter() - t) * 1e3
