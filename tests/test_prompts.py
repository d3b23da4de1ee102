"""Templates, placeholders and token expansion against InternVL's conversation.py / chat().

The expected prompt strings are written out by hand from OpenGVLab/InternVL
internvl_chat/internvl/conversation.py (SeparatorStyle.MPT: system_template.format(...) + sep, then
role + message + sep per message, then the bare assistant role), not produced by the code under test.
"""
import numpy as np
import pytest

from edgevl.prompts import (IMG_CONTEXT, IMG_END, IMG_START, TEMPLATES, ImageChunk, PromptError, build_query,
                            checkpoint_system_message, get_template, prompt_chunks, render_prompt, tokenize_prompt)
from edgevl.testing.tokenizers import FAMILY_FORMATS

SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
HISTORY = [("<image>\nWhat is in the picture?", "A cat on a sofa."), ("What color is the sofa?", "Red.")]
QUERY = "Is the cat asleep?"

CHATML_EXPECTED = (
    "<|im_start|>system\n" + SYSTEM + "<|im_end|>"
    "<|im_start|>user\n<image>\nWhat is in the picture?<|im_end|>"
    "<|im_start|>assistant\nA cat on a sofa.<|im_end|>"
    "<|im_start|>user\nWhat color is the sofa?<|im_end|>"
    "<|im_start|>assistant\nRed.<|im_end|>"
    "<|im_start|>user\nIs the cat asleep?<|im_end|>"
    "<|im_start|>assistant\n"
)
PHI3_EXPECTED = (
    "<|system|>\n" + SYSTEM + "<|end|>"
    "<|user|>\n<image>\nWhat is in the picture?<|end|>"
    "<|assistant|>\nA cat on a sofa.<|end|>"
    "<|user|>\nWhat color is the sofa?<|end|>"
    "<|assistant|>\nRed.<|end|>"
    "<|user|>\nIs the cat asleep?<|end|>"
    "<|assistant|>\n"
)
COMBOS = [(family, fmt) for family, fmts in FAMILY_FORMATS.items() for fmt in fmts]
FAMILY_TEMPLATE = {"qwen2": "Hermes-2", "internlm2": "internlm2-chat", "phi3": "phi3-chat"}


@pytest.mark.parametrize("name,expected", [("Hermes-2", CHATML_EXPECTED), ("internlm2-chat", CHATML_EXPECTED),
                                           ("phi3-chat", PHI3_EXPECTED)])
def test_two_turn_history_renders_exactly(name, expected):
    assert render_prompt(get_template(name), QUERY, HISTORY) == expected
    assert render_prompt(name, QUERY, HISTORY) == expected


def test_first_turn_and_system_message_override():
    assert render_prompt(get_template("Hermes-2"), "<image>\nHi", system_message="Answer the questions.") == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nHi<|im_end|>"
        "<|im_start|>assistant\n")
    assert render_prompt(get_template("phi3-chat"), "Hi", system_message="") == (
        "<|system|>\n<|end|><|user|>\nHi<|end|><|assistant|>\n")


def test_empty_message_gets_no_separator_like_get_prompt():
    # Conversation.get_prompt() tests `if message:`, so "" is rendered like None: the role alone.
    assert render_prompt(get_template("phi3-chat"), "Next?", [("Q", "")], system_message="S") == (
        "<|system|>\nS<|end|><|user|>\nQ<|end|><|assistant|>\n<|user|>\nNext?<|end|><|assistant|>\n")


def test_template_fields_stop_tokens_and_versions():
    assert set(TEMPLATES) == {"Hermes-2", "internlm2-chat", "phi3-chat"}
    assert {n: t.stop_token for n, t in TEMPLATES.items()} == {
        "Hermes-2": "<|im_end|>", "internlm2-chat": "<|im_end|>", "phi3-chat": "<|end|>"}
    assert all(t.system_message == SYSTEM for t in TEMPLATES.values())
    assert get_template("internlm2-chat", version="v1.5").system_message == (
        "You are an AI assistant whose name is InternLM (书生·浦语).")
    assert get_template("phi3-chat", version="v1.5").system_message == "You are an AI assistant whose name is Phi-3."
    assert get_template("phi3-chat", version="v1.5").sep == "<|end|>"
    with pytest.raises(PromptError, match="Hermes-2.*internlm2-chat.*phi3-chat"):
        get_template("vicuna_v1.1")
    with pytest.raises(PromptError, match="version"):
        get_template("phi3-chat", version="v3")


def test_checkpoint_system_message_reads_config_or_conversation_py(tmp_path):
    (tmp_path / "conversation.py").write_text(
        "register_conv_template(\n    Conversation(\n        name='internlm2-chat',\n"
        "        system_template='<|im_start|>system\\n{system_message}',\n"
        "        system_message='You are an AI assistant whose name is InternLM (书生·浦语).',\n"
        "        roles=('<|im_start|>user\\n', '<|im_start|>assistant\\n'),\n"
        "        sep_style=SeparatorStyle.MPT,\n        sep='<|im_end|>',\n    )\n)\n", encoding="utf-8")
    assert checkpoint_system_message(tmp_path, "internlm2-chat") == (
        "You are an AI assistant whose name is InternLM (书生·浦语).")
    assert checkpoint_system_message(tmp_path, "phi3-chat") is None
    (tmp_path / "config.json").write_text('{"system_message": "Be brief."}', encoding="utf-8")
    assert checkpoint_system_message(tmp_path, "internlm2-chat") == "Be brief."
    assert checkpoint_system_message(tmp_path / "missing", "internlm2-chat") is None


# -- build_query -----------------------------------------------------------------------------------------

def test_build_query_adds_placeholders_like_chat():
    assert build_query("Describe it.", 0) == "Describe it."
    assert build_query("Describe it.", 1) == "<image>\nDescribe it."
    assert build_query("Compare.", 3) == "Image-1: <image>\nImage-2: <image>\nImage-3: <image>\nCompare."
    placed = "Left <image> and right <image>: which is bigger?"
    assert build_query(placed, 2) == placed
    assert build_query("<image>\nWhat?", 1) == "<image>\nWhat?"


def test_build_query_errors_say_both_counts():
    with pytest.raises(PromptError, match=r"2 <image>.*3 images"):
        build_query("<image> and <image>", 3)
    with pytest.raises(PromptError, match=r"1 <image>.*no images"):
        build_query("<image>\nWhat?", 0)
    with pytest.raises(PromptError, match=">= 0"):
        build_query("What?", -1)


# -- tokenize_prompt -------------------------------------------------------------------------------------

def _expand(prompt, tiles, per_tile=256):
    for t in tiles:
        prompt = prompt.replace("<image>", IMG_START + IMG_CONTEXT * (per_tile * t) + IMG_END, 1)
    return prompt


def test_prompt_chunks_alternate_text_and_images():
    chunks = prompt_chunks("a<image>b<image>", [1, 7], 256)
    assert chunks == ["a", ImageChunk(0, 1, 256), "b", ImageChunk(1, 7, 1792), ""]


@pytest.mark.parametrize("family,fmt", COMBOS)
def test_expansion_counts_bos_and_equality_with_string_expansion(tokenizers, family, fmt):
    tok, ids = tokenizers[family, fmt]
    template = get_template(FAMILY_TEMPLATE[family])
    query = build_query("What differs between them? 有什么不同？🐱", 2)
    prompt = render_prompt(template, query, [("<image>\nWhat is it?", "A cat 猫.")])
    tiles = [1, 7, 3]  # the history's image, then the two new ones
    got = tokenize_prompt(tok, prompt, tiles)
    assert got.dtype == np.int64 and got.ndim == 1
    assert got.tolist() == tok.encode(_expand(prompt, tiles))

    start, end, context = ids[IMG_START], ids[IMG_END], ids[IMG_CONTEXT]
    starts, ends = np.flatnonzero(got == start), np.flatnonzero(got == end)
    assert len(starts) == len(ends) == 3
    assert [e - s - 1 for s, e in zip(starts, ends)] == [256, 1792, 768]
    for s, e in zip(starts, ends):
        assert (got[s + 1:e] == context).all()
    assert int((got == context).sum()) == 256 * 11
    if tok.add_bos:
        assert got[0] == tok.bos_token_id and int((got == tok.bos_token_id).sum()) == 1
    else:
        assert family == "qwen2" and got[0] == ids["<|im_start|>"]


@pytest.mark.parametrize("family,fmt", COMBOS)
def test_expansion_edge_positions_match_string_expansion(tokenizers, family, fmt):
    tok, _ = tokenizers[family, fmt]
    for prompt, tiles in [("<image>", [2]), ("<image><image>", [1, 1]), ("<image>\n  spaced  text <image>", [1, 2]),
                          ("no image at all", []), ("Image-1: <image>\nImage-2: <image>\nDiff?", [1, 1]),
                          (render_prompt(get_template(FAMILY_TEMPLATE[family]), "<image>\nHi"), [5])]:
        assert tokenize_prompt(tok, prompt, tiles, 4).tolist() == tok.encode(_expand(prompt, tiles, 4)), prompt


def test_tokenize_prompt_errors(tokenizers):
    tok, _ = tokenizers["qwen2", "json"]
    with pytest.raises(PromptError, match=r"2 <image>.*1 images"):
        tokenize_prompt(tok, "<image> and <image>", [3])
    with pytest.raises(PromptError, match=r"0 <image>.*1 images"):
        tokenize_prompt(tok, "no placeholder", [1])
    with pytest.raises(PromptError, match="positive"):
        tokenize_prompt(tok, "<image>", [0])
    with pytest.raises(PromptError, match="positive"):
        tokenize_prompt(tok, "<image>", [1], tokens_per_tile=0)
