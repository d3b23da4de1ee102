"""The decode loop: prefill once, then one KV-cached step a token, text streamed as it becomes final.

Backend-free numpy (no torch): it drives any `edgevl.backends.base.Decoder`.
Text passes two hold-back stages before it is streamed: the detokenizer keeps an incomplete UTF-8
character, and the stop-string buffer keeps a tail that could still begin a stop string. So the
streamed pieces, joined, are exactly `DecodeRun.text` however generation ends.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Iterator

import numpy as np

from .errors import SettingError

from .sampling import sample_next

STOP_REASONS = ("stop_token", "stop_string", "max_new_tokens", "max_seq")


def _invalid(name: str, value, requirement: str) -> SettingError:
    return SettingError("GenerationConfig", name, value, requirement)


@dataclass
class GenerationConfig:
    """How to choose tokens and when to stop; the filters mean what transformers' do (see sampling.py)."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # None: fresh entropy each run
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self):
        # a bare id or string means one stop, not a sequence of digits/characters
        if isinstance(self.stop_token_ids, Integral):
            self.stop_token_ids = (self.stop_token_ids,)
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        self.stop_token_ids = tuple(self.stop_token_ids)
        self.stop_strings = tuple(self.stop_strings)
        self._validate()

    def _validate(self):
        def is_int(v):
            return isinstance(v, Integral) and not isinstance(v, bool)

        if not (is_int(self.max_new_tokens) and self.max_new_tokens >= 1):
            raise _invalid("max_new_tokens", self.max_new_tokens, "must be an integer >= 1")
        if not isinstance(self.temperature, Real) or (self.do_sample and not self.temperature > 0):
            raise _invalid("temperature", self.temperature,
                           "must be > 0 when do_sample (use do_sample=False for greedy)")
        if not (is_int(self.top_k) and self.top_k >= 0):
            raise _invalid("top_k", self.top_k, "must be an integer >= 0 (0 disables top-k)")
        if not (isinstance(self.top_p, Real) and 0 < self.top_p <= 1):
            raise _invalid("top_p", self.top_p, "must be in (0, 1] (1 disables top-p)")
        if not (isinstance(self.repetition_penalty, Real) and self.repetition_penalty > 0):
            raise _invalid("repetition_penalty", self.repetition_penalty, "must be > 0 (1 disables it)")
        if not (self.seed is None or (is_int(self.seed) and self.seed >= 0)):
            raise _invalid("seed", self.seed, "must be an integer >= 0, or None for fresh entropy")
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise _invalid("stop_token_ids", self.stop_token_ids, "must be non-negative integer token ids")
        if not all(isinstance(s, str) and s for s in self.stop_strings):
            raise _invalid("stop_strings", self.stop_strings, "must be non-empty strings")


class IncrementalDetokenizer:
    """Text as it is decoded, never a broken multi-byte character.

    Byte-level BPE and byte-fallback pieces can split one character over several tokens; decoding a
    partial character yields U+FFFD, so such a tail is held back until it completes (or flush()).
    Each push decodes only a window, never the whole history: tokens[prefix_offset:], i.e. the
    tokens not yet emitted plus those of the previous emitted piece as context. The new text is the
    window's decoding minus the context's decoding (sentencepiece drops the leading space of a
    window's first piece, so that context keeps word boundaries right).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # start of the context window
        self.read_offset = 0  # tokens before this have been emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _new_text(self) -> str:
        emitted = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        window = self._decode(self.token_ids[self.prefix_offset:])
        return window[len(emitted):] if len(window) > len(emitted) else ""

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final with it (may be "")."""
        self.token_ids.append(int(token_id))
        new_text = self._new_text()
        if not new_text or new_text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return new_text

    def flush(self) -> str:
        """Whatever is held back (an incomplete character comes out as U+FFFD)."""
        new_text = self._new_text()
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return new_text


class _StopStringBuffer:
    """Holds back text that could still be the start of a stop string."""

    def __init__(self, stop_strings: tuple[str, ...]):
        self.stop_strings = stop_strings
        self.pending = ""

    def _held_length(self) -> int:
        """Length of the longest tail of pending that is a proper prefix of some stop string."""
        held = 0
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(self.pending)), held, -1):
                if self.pending.endswith(stop[:n]):
                    held = n
                    break
        return held

    def feed(self, text: str) -> tuple[str, bool]:
        """Add final text; return (text safe to stream, whether a stop string was found)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        cut = len(self.pending) - self._held_length()
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def finish(self, text: str) -> tuple[str, bool]:
        """Generation is over: nothing more can complete a stop string, release everything."""
        out, hit = self.feed(text)
        out, self.pending = out + self.pending, ""
        return out, hit


def _elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


class DecodeRun:
    """One generation: prefill, then KV-cached decode steps. Iterate it to stream text pieces.

    Limits: len(prompt) + len(generated) never exceeds decoder.max_seq (a stop token counts as
    generated); stop_reason is "max_seq" when one more token would not fit. The first token comes
    from the prefill logits; each later token costs one decoder.decode call (a "decode step").

    After the run:
      token_ids   generated ids, excluding a stop token id that ended the run, including the
                  token that completed a stop string
      text        the generated text (special tokens skipped), cut exactly before the first stop
                  string; equal to the streamed pieces joined
      stop_reason one of STOP_REASONS
      prefill_ms  the decoder.prefill call
      time_to_first_token_ms  prefill plus choosing the first token
      decode_ms   decoder.decode calls plus sampling, summed over decode steps (time the consumer
                  spends between streamed pieces is not counted)
    A consumer that stops iterating early leaves a partial run (stop_reason None).
    """

    def __init__(self, decoder, inputs_embeds: np.ndarray, prompt_ids: np.ndarray, tokenizer,
                 config: GenerationConfig | None = None):
        self.decoder = decoder
        self.inputs_embeds = np.asarray(inputs_embeds, dtype=np.float32)
        self.prompt_ids = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        self.tokenizer = tokenizer
        self.config = config if config is not None else GenerationConfig()
        self._check_prompt()
        self.token_ids: list[int] = []
        self.text = ""
        self.stop_reason: str | None = None
        self.prefill_ms = self.decode_ms = self.time_to_first_token_ms = 0.0
        self.decode_steps = 0
        self._started = False

    def _check_prompt(self):
        n_prompt, max_seq = len(self.prompt_ids), self.decoder.max_seq
        if self.inputs_embeds.ndim != 2 or self.inputs_embeds.shape[0] != n_prompt:
            raise ValueError(f"inputs_embeds must be [N, H] with N = len(prompt_ids) = {n_prompt}, "
                             f"got shape {self.inputs_embeds.shape}")
        if n_prompt == 0:
            raise ValueError("the prompt is empty: generation needs at least one prompt token")
        if n_prompt >= max_seq:
            raise ValueError(f"the prompt is {n_prompt} tokens but the decoder holds max_seq={max_seq} positions, "
                             "leaving no room to generate; use an engine exported with a longer --max-seq, "
                             "or fewer image tiles (lower max_num) / a shorter prompt")

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode steps per second: tokens chosen after the first (each from one decoder.decode call,
        a final stop token included) divided by decode_ms / 1000; 0.0 when there were none."""
        return self.decode_steps / (self.decode_ms / 1e3) if self.decode_ms > 0 else 0.0

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("this DecodeRun has already run; create a new DecodeRun to generate again")
        self._started = True
        return self._generate()

    def run(self) -> "DecodeRun":
        for _ in self:
            pass
        return self

    def _generate(self) -> Iterator[str]:
        config = self.config
        rng = np.random.default_rng(config.seed)
        history = dict.fromkeys(self.prompt_ids.tolist())  # ordered set, for the repetition penalty
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        stops = _StopStringBuffer(config.stop_strings)

        start = time.perf_counter()
        logits = self.decoder.prefill(self.inputs_embeds)
        self.prefill_ms = _elapsed_ms(start)
        token = sample_next(logits, config, rng, history.keys())
        self.time_to_first_token_ms = _elapsed_ms(start)
        while True:
            piece, reason = self._accept(token, detokenizer, stops)
            self.text += piece
            self.stop_reason = reason
            if piece:
                yield piece
            if reason is not None:
                return
            history[token] = None
            step_start = time.perf_counter()
            logits = self.decoder.decode(token)
            token = sample_next(logits, config, rng, history.keys())
            self.decode_ms += _elapsed_ms(step_start)
            self.decode_steps += 1

    def _accept(self, token: int, detokenizer: IncrementalDetokenizer,
                stops: _StopStringBuffer) -> tuple[str, str | None]:
        """Take one chosen token: return (text now safe to stream, stop reason or None)."""
        if token in self.config.stop_token_ids:
            piece, hit = stops.finish(detokenizer.flush())
            return piece, "stop_string" if hit else "stop_token"
        self.token_ids.append(token)
        piece, hit = stops.feed(detokenizer.push(token))
        if hit:
            return piece, "stop_string"
        if len(self.token_ids) >= self.config.max_new_tokens:
            reason = "max_new_tokens"
        elif len(self.prompt_ids) + len(self.token_ids) >= self.decoder.max_seq:
            reason = "max_seq"
        else:
            return piece, None
        tail, hit = stops.finish(detokenizer.flush())
        return piece + tail, "stop_string" if hit else reason
