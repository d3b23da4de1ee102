"""The decode loop with a scripted fake decoder and byte-level fake tokenizers (no torch)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from edgevl.generation import DecodeRun, GenerationConfig, IncrementalDetokenizer

EOS = 0
PIECES = {
    EOS: b"<eos>", 1: b"a", 2: b"b", 3: b" ", 17: b"c",
    4: b"\xc3", 5: b"\xa9",  # é
    6: b"\xe4", 7: b"\xb8", 8: b"\xad", 18: b"\xe4\xb8",  # 中, and its first two bytes as one token
    9: b"\xf0", 10: b"\x9f", 11: b"\x98", 12: b"\x80",  # 😀 as four single-byte tokens
    13: b"</s>", 14: b"</", 15: b"s>", 16: b"x</s>y",
    19: b"\xff",  # never valid UTF-8
}
VOCAB = 24
HIDDEN = 4


class PieceTokenizer:
    """decode() joins byte pieces and decodes with errors="replace", like byte-level BPE."""

    def __init__(self, pieces=PIECES, special=(EOS,)):
        self.pieces, self.special = pieces, set(special)
        self.decoded_lengths: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.decoded_lengths.append(len(ids))
        kept = [i for i in ids if not (skip_special_tokens and i in self.special)]
        return b"".join(self.pieces[i] for i in kept).decode("utf-8", errors="replace")


class ScriptedDecoder:
    """Greedy picks script[i] at step i (step 0 = prefill logits), then `filler`; checks cache use."""

    def __init__(self, script, max_seq=64, filler=1, step_sleep_s=0.0):
        self.script, self.max_seq, self.filler, self.step_sleep_s = list(script), max_seq, filler, step_sleep_s
        self.cache_len = 0
        self.prefill_calls = 0
        self.fed: list[int] = []

    def _logits(self):
        step = len(self.fed)
        logits = np.zeros(VOCAB, np.float32)
        logits[self.script[step] if step < len(self.script) else self.filler] = 10.0
        return logits

    def prefill(self, inputs_embeds):
        assert inputs_embeds.dtype == np.float32 and inputs_embeds.shape[1] == HIDDEN
        assert len(inputs_embeds) <= self.max_seq
        self.prefill_calls += 1
        self.cache_len = len(inputs_embeds)
        time.sleep(self.step_sleep_s)
        return self._logits()

    def decode(self, token_id):
        assert self.cache_len < self.max_seq, "KV cache overflow"
        self.cache_len += 1
        self.fed.append(token_id)
        time.sleep(self.step_sleep_s)
        return self._logits()


class ConstantDecoder(ScriptedDecoder):
    def __init__(self, logits, max_seq=64):
        super().__init__([], max_seq)
        self.logits = np.asarray(logits, np.float32)

    def _logits(self):
        return self.logits.copy()


def make_run(decoder, prompt_len=3, tokenizer=None, **config):
    prompt_ids = np.full(prompt_len, 3, np.int64)
    embeds = np.zeros((prompt_len, HIDDEN), np.float32)
    return DecodeRun(decoder, embeds, prompt_ids, tokenizer or PieceTokenizer(), GenerationConfig(**config))


def stream(run):
    pieces = list(run)
    assert all(pieces), "empty pieces are never yielded"
    assert "".join(pieces) == run.text
    return pieces


# ---- the loop ----

def test_greedy_follows_decoder_and_first_token_comes_from_prefill():
    decoder = ScriptedDecoder([1, 2, 3, 17])
    run = make_run(decoder, max_new_tokens=4)
    pieces = stream(run)
    assert run.token_ids == [1, 2, 3, 17] and run.text == "ab c" and pieces == ["a", "b", " ", "c"]
    assert run.stop_reason == "max_new_tokens"
    assert decoder.prefill_calls == 1 and decoder.fed == [1, 2, 3]  # the last token is never fed back
    assert run.decode_steps == 3


def test_streaming_is_lazy():
    decoder = ScriptedDecoder([1, 2, 17, 1])
    pieces = iter(make_run(decoder, max_new_tokens=4))
    assert next(pieces) == "a" and decoder.fed == []
    assert next(pieces) == "b" and decoder.fed == [1]


@pytest.mark.parametrize("stop_id", [EOS, 17])
def test_stop_token_ends_run_and_is_never_decoded(stop_id):
    decoder = ScriptedDecoder([1, 2, stop_id, 1])
    run = make_run(decoder, stop_token_ids=(EOS, 17))
    stream(run)
    assert run.token_ids == [1, 2] and run.text == "ab" and run.stop_reason == "stop_token"
    assert decoder.fed == [1, 2]


def test_stop_token_releases_held_text():
    run = make_run(ScriptedDecoder([1, 14, EOS]), stop_token_ids=[EOS], stop_strings=["</s>"])
    assert stream(run) == ["a", "</"] and run.stop_reason == "stop_token"


@pytest.mark.parametrize("script, stops, text, token_ids, reason", [
    ([1, 13, 2], ("</s>",), "a", [1, 13], "stop_string"),  # stop string is one token
    ([1, 14, 15, 2], ("</s>",), "a", [1, 14, 15], "stop_string"),  # split over two tokens
    ([1, 16, 2], ("</s>",), "ax", [1, 16], "stop_string"),  # inside a token: cut mid-token
    ([1, 1, 2, 17], ("ab",), "a", [1, 1, 2], "stop_string"),  # overlapping partial match "aab"
    ([1, 1, 1, 17], ("aab",), "aaac", [1, 1, 1, 17], "max_new_tokens"),  # "aaa" then "c": no match
    ([14, 1, 15, 2], ("</s>",), "</as>b", [14, 1, 15, 2], "max_new_tokens"),  # false start released
    ([1, 14], ("</s>",), "a</", [1, 14], "max_new_tokens"),  # partial match at the end released
    ([1, 2, 1], ("ba", "ab"), "", [1, 2], "stop_string"),  # earliest occurrence wins
    ([1, 6, 7, 8, 2], ("中",), "a", [1, 6, 7, 8], "stop_string"),  # multi-byte stop split in bytes
    ([1, 18, 8, 2], ("a中b",), "", [1, 18, 8, 2], "stop_string"),
])
def test_stop_strings_cut_exactly(script, stops, text, token_ids, reason):
    run = make_run(ScriptedDecoder(script), max_new_tokens=len(script), stop_strings=stops)
    pieces = stream(run)
    assert (run.text, run.token_ids, run.stop_reason) == (text, token_ids, reason)
    assert not any("\ufffd" in p for p in pieces)


def test_stop_string_pieces_are_held_until_resolved():
    decoder = ScriptedDecoder([1, 14, 1, 14, 15])
    pieces = []
    for piece in make_run(decoder, stop_strings=["</s>"]):
        pieces.append((piece, len(decoder.fed)))
    # "</" is held at step 1 and released when "a" shows it was no stop; the second "</" never streams
    assert pieces == [("a", 0), ("</a", 2)]


def test_multibyte_characters_stream_whole():
    tokenizer = PieceTokenizer()
    script = [4, 5, 6, 7, 8, 9, 10, 11, 12, 1, 18, 8, 3]
    run = make_run(ScriptedDecoder(script), tokenizer=tokenizer, max_new_tokens=len(script))
    assert stream(run) == ["é", "中", "😀", "a", "中", " "]
    assert run.text == "é中😀a中 "


def test_random_utf8_through_byte_tokens_has_no_replacement_char():
    rng = np.random.default_rng(0)
    alphabet = "aZ 9éßñ中文字😀🚀ü€→\n"
    text = "".join(rng.choice(list(alphabet), 200))
    byte_pieces = {b: bytes([b]) for b in range(256)}
    tokenizer = PieceTokenizer(byte_pieces, special=())
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push(b) for b in text.encode()]
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert max(tokenizer.decoded_lengths) <= 8  # a small window, never the whole history


def test_invalid_bytes_are_replaced_not_held_forever():
    detokenizer = IncrementalDetokenizer(PieceTokenizer())
    assert detokenizer.push(19) == ""  # ends in U+FFFD: could be an incomplete character
    assert detokenizer.push(1) == "\ufffda"
    assert detokenizer.push(6) == ""
    assert detokenizer.flush() == "\ufffd"  # an incomplete character at the end
    assert detokenizer.flush() == ""


def test_special_tokens_skipped_by_default():
    detokenizer = IncrementalDetokenizer(PieceTokenizer())
    assert [detokenizer.push(t) for t in (1, EOS, 2)] == ["a", "", "b"]
    keep = IncrementalDetokenizer(PieceTokenizer(), skip_special_tokens=False)
    assert [keep.push(t) for t in (1, EOS, 2)] == ["a", "<eos>", "b"]


class SentencePieceLikeTokenizer:
    """Drops the leading space of the first piece, as sentencepiece does with "▁"."""

    pieces = {1: "▁Hello", 2: "▁world", 3: "!", 4: "▁again"}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids).replace("▁", " ").removeprefix(" ")


def test_detokenizer_keeps_word_boundaries_with_sentencepiece():
    detokenizer = IncrementalDetokenizer(SentencePieceLikeTokenizer())
    assert "".join(detokenizer.push(t) for t in (1, 2, 3, 4)) == "Hello world! again"


# ---- limits ----

def test_max_seq_stops_before_the_cache_overflows():
    decoder = ScriptedDecoder([1, 2, 17, 1, 2], max_seq=8)
    run = make_run(decoder, prompt_len=5, max_new_tokens=100)
    stream(run)
    assert run.stop_reason == "max_seq" and run.token_ids == [1, 2, 17] and run.text == "abc"
    assert 5 + len(run.token_ids) == 8 and decoder.cache_len <= 8


def test_prompt_one_short_of_max_seq_gives_one_token():
    decoder = ScriptedDecoder([2], max_seq=8)
    run = make_run(decoder, prompt_len=7).run()
    assert run.token_ids == [2] and run.stop_reason == "max_seq" and decoder.fed == []


@pytest.mark.parametrize("prompt_len", [8, 20])
def test_prompt_too_long_fails_before_any_compute(prompt_len):
    decoder = ScriptedDecoder([1], max_seq=8)
    with pytest.raises(ValueError) as error:
        make_run(decoder, prompt_len=prompt_len)
    message = str(error.value)
    assert f"{prompt_len} tokens" in message and "max_seq=8" in message
    assert "--max-seq" in message and "tiles" in message
    assert decoder.prefill_calls == 0


def test_embeds_must_match_prompt():
    with pytest.raises(ValueError, match="inputs_embeds"):
        DecodeRun(ScriptedDecoder([1]), np.zeros((2, HIDDEN), np.float32), [3, 3, 3], PieceTokenizer(),
                  GenerationConfig())


def test_a_run_runs_once():
    run = make_run(ScriptedDecoder([1]), max_new_tokens=2).run()
    assert run.text == "aa"
    with pytest.raises(RuntimeError, match="already run"):
        list(run)


def test_repetition_penalty_in_the_loop_covers_prompt_and_generated():
    logits = np.zeros(VOCAB, np.float32)
    logits[1], logits[2] = 2.0, 1.5
    run = make_run(ConstantDecoder(logits), max_new_tokens=4, repetition_penalty=2.0).run()
    assert run.token_ids == [1, 2, 1, 1]  # 2.0 | 1.0 < 1.5 | 1.0 > 0.75 | ...
    prompt_has_1 = DecodeRun(ConstantDecoder(logits), np.zeros((2, HIDDEN), np.float32), [1, 5],
                             PieceTokenizer(), GenerationConfig(max_new_tokens=1, repetition_penalty=2.0)).run()
    assert prompt_has_1.token_ids == [2]


def test_seeded_sampling_in_the_loop():
    flat = np.full(VOCAB, -np.inf, np.float32)
    flat[[1, 2, 3, 13, 17]] = 0.0  # plain ASCII tokens, uniformly likely

    def tokens(seed):
        return make_run(ConstantDecoder(flat), max_new_tokens=30, do_sample=True, seed=seed).run().token_ids

    assert tokens(7) == tokens(7)
    assert tokens(7) != tokens(8)
    assert tokens(None) != tokens(None)


def test_timings():
    decoder = ScriptedDecoder([1] * 6, step_sleep_s=0.002)
    run = make_run(decoder, max_new_tokens=6).run()
    assert run.prefill_ms >= 2.0 and run.time_to_first_token_ms >= run.prefill_ms
    assert run.decode_steps == 5 and run.decode_ms >= 10.0
    assert run.decode_tokens_per_s == pytest.approx(5 / (run.decode_ms / 1e3))
    assert run.decode_tokens_per_s < 500
    one = make_run(ScriptedDecoder([1]), max_new_tokens=1).run()
    assert one.decode_steps == 0 and one.decode_tokens_per_s == 0.0


# ---- config ----

@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", 0), ("max_new_tokens", 2.5), ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5),
    ("top_p", float("nan")), ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("stop_strings", ("ok", "")), ("stop_token_ids", (-1,)), ("seed", "42"),
])
def test_config_validation_names_field_and_value(field, value):
    with pytest.raises(ValueError, match=rf"GenerationConfig\.{field}=.*is invalid"):
        GenerationConfig(**{field: value})


def test_temperature_checked_only_when_sampling():
    with pytest.raises(ValueError, match=r"temperature=0\.0"):
        GenerationConfig(do_sample=True, temperature=0.0)
    assert GenerationConfig(temperature=0.0).temperature == 0.0  # ignored by greedy


def test_config_normalizes_sequences():
    config = GenerationConfig(stop_token_ids=[2, 5], stop_strings=["</s>"])
    assert config.stop_token_ids == (2, 5) and config.stop_strings == ("</s>",)
    assert GenerationConfig(stop_strings="</s>", stop_token_ids=7).stop_strings == ("</s>",)
    assert GenerationConfig(stop_token_ids=7).stop_token_ids == (7,)
