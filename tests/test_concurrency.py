"""One EdgeVL, many callers: threads are serialized (each result equals its single-threaded result), and streams
in one thread either run one at a time or fail loudly, never interleave."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from edgevl import EdgeVL
from edgevl.synthetic import synthetic_image

PROMPTS = ["Describe the image.", "What colours are there?", "Count the shapes.", "Is there text?"]
NEW_TOKENS = 12


def _calls():
    return [(prompt, synthetic_image(300 + 150 * i, 400, seed=20 + i)) for i, prompt in enumerate(PROMPTS)]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_four_threads_get_their_single_threaded_results(exported, precision):
    model = EdgeVL.from_pretrained(exported("qwen2", precision))
    calls = _calls()
    alone = [model.generate(p, im, max_new_tokens=NEW_TOKENS).token_ids for p, im in calls]
    assert len({tuple(t) for t in alone}) > 1  # the calls differ, so a mix-up would show

    def run(i):
        prompt, image = calls[i % len(calls)]
        if i % 2:  # half of them stream
            text = "".join(model.stream(prompt, image, max_new_tokens=NEW_TOKENS))
            return i, model.tokenizer.encode(text, add_bos=False), text
        result = model.generate(prompt, image, max_new_tokens=NEW_TOKENS)
        return i, result.token_ids, result.text

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(8)))
    for i, ids, text in results:
        expected = alone[i % len(calls)]
        if i % 2:
            assert text == model.tokenizer.decode(expected), i
        else:
            assert ids == expected, i


def test_a_second_stream_in_the_same_thread_is_refused_not_interleaved(exported):
    model = EdgeVL.from_pretrained(exported("qwen2"))
    image = synthetic_image(448, 448)
    expected = model.generate("Describe.", image, max_new_tokens=NEW_TOKENS).text
    first = model.stream("Describe.", image, max_new_tokens=NEW_TOKENS)
    head = next(first)
    with pytest.raises(RuntimeError, match="open stream"):
        model.stream("Something else.", image, max_new_tokens=NEW_TOKENS)
    with pytest.raises(RuntimeError, match="open stream"):
        model.generate("Something else.", image, max_new_tokens=NEW_TOKENS)
    assert head + "".join(first) == expected  # the refused calls changed nothing
    with model.stream("Describe.", image, max_new_tokens=NEW_TOKENS) as pieces:
        next(pieces)  # closed early by the with block
    abandoned = model.stream("Describe.", image, max_new_tokens=NEW_TOKENS)
    del abandoned  # collected: the model is free again
    assert model.generate("Describe.", image, max_new_tokens=NEW_TOKENS).text == expected


def test_another_thread_waits_for_an_open_stream(exported):
    model = EdgeVL.from_pretrained(exported("qwen2"))
    image = synthetic_image(448, 448)
    stream = model.stream("Describe.", image, max_new_tokens=NEW_TOKENS)
    started, finished = threading.Event(), threading.Event()

    def other():
        started.set()
        model.generate("Describe.", image, max_new_tokens=2)
        finished.set()

    thread = threading.Thread(target=other)
    thread.start()
    started.wait()
    assert not finished.wait(0.5)  # blocked behind the stream
    stream.close()
    thread.join(timeout=60)
    assert finished.is_set()


@pytest.mark.parametrize("prompt", [None, b"Describe.", 3])
def test_a_prompt_that_is_not_text_is_a_type_error(exported, prompt):
    model = EdgeVL.from_pretrained(exported("qwen2"))
    with pytest.raises(TypeError, match="prompt must be a str"):
        model.generate(prompt, np.zeros((8, 8, 3), np.uint8))
    assert model.generate("Hi", max_new_tokens=2).token_ids  # and the model is not left locked
