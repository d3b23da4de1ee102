"""EdgeVL end to end on a tiny random checkpoint: results, streaming, chat, bad input, CLI."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgevl import EdgeVL
from edgevl.cli import main
from edgevl.preprocess import ImageError
from edgevl.prompts import PromptError
from edgevl.synthetic import synthetic_image, write_demo_image


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return EdgeVL.from_pretrained(tiny_checkpoint("internlm2"))


def test_generate_reports_text_tokens_and_timings(model):
    result = model.generate("Describe this image.", synthetic_image(900, 500), max_new_tokens=12)
    assert result.tiles_per_image == [3]
    assert result.prompt_tokens > 3 * 256
    assert 1 <= len(result.token_ids) <= 12
    if result.stop_reason == "max_new_tokens":
        assert result.text == model.tokenizer.decode(result.token_ids)
    t = result.timings
    assert t.preprocess_ms > 0 and t.vision_ms > 0 and t.prefill_ms > 0
    assert t.time_to_first_token_ms >= t.vision_ms + t.prefill_ms


def test_stream_yields_the_same_text_as_generate(model):
    image = synthetic_image(640, 480)
    full = model.generate("What is this?", image, max_new_tokens=10)
    pieces = list(model.stream("What is this?", image, max_new_tokens=10))
    assert "".join(pieces) == full.text == model.last_result.text
    assert model.last_result.token_ids == full.token_ids


def test_seeded_sampling_is_reproducible(model):
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    a = model.generate("Tell me a story.", **kwargs)
    b = model.generate("Tell me a story.", **kwargs)
    c = model.generate("Tell me a story.", **{**kwargs, "seed": 8})
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_chat_keeps_history_and_does_not_reencode_images(model):
    calls = []
    encode = model.backend.encode_images
    model.backend.encode_images = lambda pv: calls.append(pv.shape[0]) or encode(pv)
    try:
        model.reset_chat()
        first = model.chat("What is in the image?", synthetic_image(640, 480), max_new_tokens=6)
        second = model.chat("And what colour is it?", max_new_tokens=6)
    finally:
        model.backend.encode_images = encode
    assert calls == [first.tiles_per_image[0]]  # the second turn reused the first turn's embeddings
    assert [t.answer for t in model.history] == [first.text, second.text]
    assert second.prompt_tokens > first.prompt_tokens + len(first.token_ids)
    model.reset_chat()
    assert model.history == []


@pytest.mark.parametrize("family", ["internlm2", "phi3"])
def test_sentencepiece_tokenizer_checkpoints_run(tiny_checkpoint, family):
    """InternVL2-2B/4B ship tokenizer.model (sentencepiece), not tokenizer.json."""
    spm = EdgeVL.from_pretrained(tiny_checkpoint(family, tokenizer_format="sentencepiece"))
    assert spm.tokenizer.format == "tokenizer.model"
    result = spm.generate("Describe this image.", synthetic_image(448, 448), max_new_tokens=6)
    assert result.prompt_tokens > 256 and result.token_ids


def test_checkpoint_system_message_is_used(tiny_checkpoint, tmp_path):
    import json
    import shutil

    d = shutil.copytree(tiny_checkpoint("qwen2"), tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "system_message": "You are a driving assistant."}))
    ids = EdgeVL.from_pretrained(d).generate("Hi", max_new_tokens=1)
    model = EdgeVL.from_pretrained(d)
    assert model.system_message == "You are a driving assistant."
    assert ids.prompt_tokens != EdgeVL.from_pretrained(tiny_checkpoint("qwen2")).generate(
        "Hi", max_new_tokens=1).prompt_tokens


def test_multiple_images_in_one_prompt(model):
    result = model.generate("Compare them.", [synthetic_image(448, 448), synthetic_image(1000, 300)],
                            max_new_tokens=4)
    assert result.tiles_per_image == [1, 4]  # 448x448 -> 1 tile, no thumbnail; 1000x300 -> 3x1 + thumbnail


def test_images_as_path_pil_and_bgr_array(model, tmp_path):
    rgb = synthetic_image(500, 400)
    path = tmp_path / "img.png"
    Image.fromarray(rgb).save(path)
    ids = [model.generate("Describe.", im, max_new_tokens=6, **kw).token_ids
           for im, kw in ((rgb, {}), (str(path), {}), (Image.fromarray(rgb), {}),
                          (rgb[..., ::-1].copy(), {"channel_order": "BGR"}))]
    assert ids[0] == ids[1] == ids[2] == ids[3]


@pytest.mark.parametrize("images, prompt, error, match", [
    (["/nonexistent/cat.jpg"], "Describe.", ImageError, "/nonexistent/cat.jpg"),
    ([np.zeros((32, 32, 3), np.float32)], "Describe.", ImageError, "float32"),
    ([np.zeros((32, 32, 4), np.uint8)], "Describe.", ImageError, r"\(32, 32, 4\)"),
    ([synthetic_image(64, 64)], "<image> and <image>", PromptError, "2"),
    ([synthetic_image(64, 64)] * 2, "only <image>", PromptError, "1"),
    ([], "what is <image>?", PromptError, "image"),
])
def test_bad_input_is_rejected_and_changes_nothing(model, images, prompt, error, match):
    model.reset_chat()
    model.chat("Hello.", max_new_tokens=2)
    before = list(model.history)
    with pytest.raises(error, match=match):
        model.chat(prompt, images or None, max_new_tokens=2)
    assert model.history == before


def test_corrupt_image_file(model, tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageError, match="broken.jpg"):
        model.generate("Describe.", path)


def test_prompt_longer_than_the_context(tiny_checkpoint):
    small = EdgeVL.from_pretrained(tiny_checkpoint("internlm2"), max_seq=512)
    with pytest.raises(PromptError, match=r"the prompt is \d+ tokens \(3 image tiles\), but the model holds 512"):
        small.generate("Describe.", synthetic_image(900, 500))
    with pytest.raises(ValueError, match="max_seq=100000"):
        EdgeVL.from_pretrained(tiny_checkpoint("internlm2"), max_seq=100000)


def test_unknown_generation_option(model):
    with pytest.raises(TypeError, match="top_z"):
        model.generate("Hi", top_z=3)


def test_cli_demo_runs_and_says_random(capsys, tmp_path):
    assert main(["demo", "--keep", str(tmp_path), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr()
    assert "RANDOM" in out.out and "tokens/s" in out.err


def test_cli_generate_streams(capsys, tiny_checkpoint, tmp_path):
    image = write_demo_image(tmp_path / "x.png", 300, 200)
    code = main(["generate", "--model", str(tiny_checkpoint("qwen2")), "--image", str(image),
                 "--prompt", "What is this?", "--stream", "--max-new-tokens", "5"])
    assert code == 0
    assert "prompt tokens" in capsys.readouterr().err


def test_cli_errors_are_one_line(capsys, tmp_path):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "config.json: missing" in capsys.readouterr().err


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    assert "--image" in capsys.readouterr().out
