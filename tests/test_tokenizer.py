"""edgevl.tokenizer against the tokenizers written by edgevl.testing.tokenizers, and against transformers."""
import json
import shutil
import time

import pytest

from edgevl.testing.tokenizers import FAMILY_FORMATS, INTERNVL_TOKENS, write_tokenizer
from edgevl.tokenizer import TokenizerError, load_tokenizer

COMBOS = [(family, fmt) for family, fmts in FAMILY_FORMATS.items() for fmt in fmts]
ROUND_TRIP = [
    "Describe the image in detail.",
    "It's 3 cars, 12 people; don't panic!",
    "请详细描述这张图片。图片中有一只猫。",
    "emoji 🐱 and one the corpus never saw 🦄🪐",
    "mixed: the cat 猫 🐱 sits on the sofa 沙发.",
    "tabs\tand\nnew lines\n\nand  double  spaces",
]
CHAT = {  # a turn in each family's own template, with an image slot
    "qwen2": "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat is it?<|im_end|><|im_start|>assistant\n",
    "internlm2": ("<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat is it?<|im_end|>"
                  "<|im_start|>assistant\n"),
    "phi3": "<|user|>\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat is it?<|end|><|assistant|>\n",
}
PARITY = ROUND_TRIP + list(CHAT.values()) + [
    "<|system|>\nYou are an AI.<|end|><|user|>\nHi<|end|>  <|assistant|>\n",
    "<ref>the dog</ref><box>[[100, 200, 300, 400]]</box>",
    "<quad></quad> CAM_FRONT <img></img>",
    "text <s> inside </s> text",
    "",
]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(family, fmt) -> (directory, {special token: id})"""
    out = {}
    for family, fmt in COMBOS:
        d = tmp_path_factory.mktemp(f"{family}-{fmt}")
        out[family, fmt] = d, write_tokenizer(d, family, fmt)
    return out


def _load(written, family, fmt):
    d, ids = written[family, fmt]
    return load_tokenizer(d), ids


# -- the written tokenizers ------------------------------------------------------------------------------

@pytest.mark.parametrize("family,fmt", COMBOS)
def test_written_tokenizer_is_small_deterministic_and_has_the_real_specials(tmp_path, family, fmt):
    start = time.perf_counter()
    ids = write_tokenizer(tmp_path / "a", family, fmt)
    assert time.perf_counter() - start < 2.0
    assert write_tokenizer(tmp_path / "b", family, fmt) == ids
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    tok = load_tokenizer(tmp_path / "a")
    assert tok.vocab_size <= 512
    assert tok.vocab_size == max(ids.values()) + 1  # InternVL's tokens come last
    first = ids["<img>"]
    assert [ids[t] for t in INTERNVL_TOKENS] == list(range(first, first + 9))
    family_specials = {"qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                       "internlm2": ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"],
                       "phi3": ["<s>", "</s>", "<unk>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>",
                                "<|end|>"]}[family]
    for token in family_specials + list(INTERNVL_TOKENS):
        assert tok.token_to_id(token) == ids[token]
        assert tok.id_to_token(ids[token]) == token
    if family == "qwen2":
        assert ids["<|im_start|>"] == ids["<|endoftext|>"] + 1 == ids["<|im_end|>"] - 1
    if family == "internlm2":  # Qwen-like order reversed: 92542 <|im_end|>, 92543 <|im_start|>, 92544 <img>
        assert ids["<|im_end|>"] + 1 == ids["<|im_start|>"] == first - 1
    if family == "phi3":  # 32000 <|endoftext|> ... 32007 <|end|> ... 32010 <|user|>, then InternVL's
        base = ids["<|endoftext|>"]
        assert [ids[t] - base for t in ("<|assistant|>", "<|system|>", "<|end|>", "<|user|>")] == [1, 6, 7, 10]
        assert first == base + 11


def test_write_tokenizer_rejects_formats_a_family_does_not_ship(tmp_path):
    with pytest.raises(ValueError, match="sentencepiece"):
        write_tokenizer(tmp_path, "qwen2", "sentencepiece")
    with pytest.raises(ValueError, match="family"):
        write_tokenizer(tmp_path, "llama", "json")


# -- loading, encode, decode -----------------------------------------------------------------------------

@pytest.mark.parametrize("family,fmt", COMBOS)
def test_round_trip_ascii_chinese_emoji(written, family, fmt):
    tok, _ = _load(written, family, fmt)
    for text in ROUND_TRIP:
        ids = tok.encode(text, add_bos=False)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode(tok.encode(text)) == text  # BOS is skipped as a special token


@pytest.mark.parametrize("family,fmt", COMBOS)
def test_special_tokens_in_text_are_single_ids(written, family, fmt):
    tok, ids = _load(written, family, fmt)
    plain = tok.encode("ab", add_bos=False)
    for token, token_id in ids.items():
        encoded = tok.encode(f"ab{token}ab", add_bos=False)
        assert encoded.count(token_id) == 1, token
        assert len(encoded) <= 2 * len(plain) + 2, token  # the token's characters were not tokenized
    assert tok.encode("<IMG_CONTEXT>" * 5, add_bos=False) == [ids["<IMG_CONTEXT>"]] * 5


@pytest.mark.parametrize("family,fmt", COMBOS)
def test_bos_added_once_by_default_as_the_reference_does(written, family, fmt):
    tok, ids = _load(written, family, fmt)
    if family == "qwen2":
        assert (tok.add_bos, tok.bos_token_id) == (False, None)
        assert tok.eos_token_id == ids["<|im_end|>"]
        return
    assert tok.add_bos and tok.bos_token_id == ids["<s>"]
    assert tok.eos_token_id == ids["</s>" if family == "internlm2" else "<|endoftext|>"]
    ids_with = tok.encode("Describe the image.")
    assert ids_with[0] == tok.bos_token_id and ids_with.count(tok.bos_token_id) == 1
    assert ids_with[1:] == tok.encode("Describe the image.", add_bos=False)


@pytest.mark.parametrize("family,fmt", COMBOS)
def test_decode_skips_special_tokens_only_when_asked(written, family, fmt):
    tok, ids = _load(written, family, fmt)
    text = CHAT[family]
    encoded = tok.encode(text, add_bos=False)
    assert tok.decode(encoded, skip_special_tokens=False) == (
        text.replace("<|user|>\n", "<|user|>").replace("<|assistant|>\n", "<|assistant|>")
        if family == "phi3" else text)  # Phi-3's role tokens are rstrip: the newline after them is eaten
    assert tok.decode(encoded) == ("\nWhat is it?" if family == "phi3" else "user\n\nWhat is it?assistant\n")
    assert set(ids.values()) - {ids.get("</s>")} <= tok.special_ids  # Phi-3's </s> is not special


def test_tokenizer_json_is_preferred_and_formats_agree(written):
    for family, other in (("qwen2", "bpe-files"), ("internlm2", "sentencepiece"), ("phi3", "sentencepiece")):
        fast, ids = _load(written, family, "json")
        slow, ids_other = _load(written, family, other)
        assert fast.format == "tokenizer.json"
        assert slow.format == ("vocab.json+merges.txt" if other == "bpe-files" else "tokenizer.model")
        assert ids == ids_other and fast.vocab_size == slow.vocab_size
        for text in PARITY:
            # Leading whitespace is where the slow sentencepiece classes and tokenizers' Metaspace/Strip
            # legitimately differ; chat prompts start with a special token.
            if text[:1].isspace():
                continue
            assert fast.encode(text) == slow.encode(text), (family, text)
            # InternLM2's fast decoder always strips one leading space (InternLM2Converter's Strip), the
            # slow class only drops sentencepiece's dummy prefix, which InternLM2's model does not add.
            fast_text, slow_text = fast.decode(fast.encode(text)), slow.decode(slow.encode(text))
            assert fast_text == (slow_text[1:] if family == "internlm2" and slow_text[:1] == " " else slow_text)


def test_phi3_non_legacy_prefix_and_rstrip(written):
    tok, ids = _load(written, "phi3", "sentencepiece")
    encoded = tok.encode("<|user|>\nHi there<|end|>")
    assert encoded[:2] == [ids["<s>"], ids["<|user|>"]] and encoded[-1] == ids["<|end|>"]
    # legacy=false: no "▁" after a special token, and rstrip ate the newline
    assert "".join(tok.id_to_token(i) for i in encoded[2:-1]) == "Hi▁there"
    # at the very start the text gets one "▁" (and a lone "▁" before a special token is dropped)
    assert tok.id_to_token(tok.encode("Hi", add_bos=False)[0]).startswith("▁")
    assert tok.encode("<|user|>", add_bos=False) == [ids["<|user|>"]]


def test_internlm2_renamed_pieces_and_decode_cleanup(written):
    tok, ids = _load(written, "internlm2", "sentencepiece")
    with pytest.raises(TokenizerError, match=r"UNUSED_TOKEN_146"):
        tok.token_to_id("[UNUSED_TOKEN_146]")  # the sentencepiece piece under <|im_start|>'s id
    assert tok.id_to_token(ids["<|im_start|>"]) == "<|im_start|>"
    assert "".join(tok.id_to_token(i) for i in tok.encode("<|im_start|>user", add_bos=False)[1:]) == "user"
    # InternLM2Tokenizer.convert_tokens_to_string always runs clean_up_tokenization
    assert tok.decode(tok.encode("Hello , world .")) == "Hello, world."


# -- references ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,fmt", [("qwen2", "json"), ("qwen2", "bpe-files"), ("internlm2", "json"),
                                        ("phi3", "json")])
def test_same_ids_as_transformers_autotokenizer(written, tmp_path, family, fmt):
    transformers = pytest.importorskip("transformers")
    d, _ = written[family, fmt]
    if family == "internlm2":
        # The real config points AutoTokenizer at InternLM2's remote code; without trust_remote_code a
        # tokenizer.json is read as it stands (TokenizersBackend).
        d = shutil.copytree(d, tmp_path / "internlm2")
        config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
        del config["auto_map"], config["tokenizer_class"]
        (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    assert ref.is_fast
    tok = load_tokenizer(d)
    for text in PARITY:
        expected = ref(text)["input_ids"]
        assert tok.encode(text) == expected, text
        assert tok.decode(expected) == ref.decode(expected, skip_special_tokens=True), text
        assert tok.decode(expected, False) == ref.decode(expected, skip_special_tokens=False), text


@pytest.mark.parametrize("family", ["internlm2", "phi3"])
def test_sentencepiece_matches_transformers_slow_tokenizer(written, tmp_path, family):
    """transformers' slow sentencepiece machinery (added-token trie, lstrip/rstrip, per-piece
    sp_model.encode) is what InternLM2Tokenizer runs, and LlamaTokenizer with legacy=True."""
    sp_backend = pytest.importorskip("transformers.tokenization_utils_sentencepiece")
    d = shutil.copytree(written[family, "sentencepiece"][0], tmp_path / family)
    config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["legacy"] = True  # legacy=false needs protobuf in transformers; covered by the Phi-3 test above
    (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ref = sp_backend.SentencePieceBackend.from_pretrained(str(d), legacy=True, sp_model_kwargs={})
    tok = load_tokenizer(d)
    for text in PARITY:
        assert tok.encode(text, add_bos=False) == ref(text)["input_ids"], text


# -- errors ----------------------------------------------------------------------------------------------

def test_missing_files_name_the_directory_and_the_files(tmp_path):
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt"):
        assert name in message
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")


def test_missing_token_names_token_and_directory(written):
    tok, _ = _load(written, "qwen2", "json")
    with pytest.raises(TokenizerError) as err:
        tok.token_to_id("<IMAGE_PATCH>")
    assert "<IMAGE_PATCH>" in str(err.value) and str(written["qwen2", "json"][0]) in str(err.value)


def test_bad_config_names_the_file_and_key(tmp_path, written):
    d = shutil.copytree(written["qwen2", "bpe-files"][0], tmp_path / "bad")
    (d / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        load_tokenizer(d)
    (d / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"480": {"special": True}}}))
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json.*'480'.*content"):
        load_tokenizer(d)
    (d / "tokenizer_config.json").unlink()
    (d / "tokenizer.json").write_text("{}", encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(d)


def test_bpe_files_without_tokenizer_config_use_added_tokens_json(tmp_path, written):
    d = shutil.copytree(written["qwen2", "bpe-files"][0], tmp_path / "plain")
    (d / "tokenizer_config.json").unlink()
    (d / "special_tokens_map.json").unlink()
    tok = load_tokenizer(d)
    ids = written["qwen2", "bpe-files"][1]
    assert tok.encode("<|im_start|>hi<img>", add_bos=False)[0] == ids["<|im_start|>"]
    assert ids["<img>"] in tok.encode("<|im_start|>hi<img>")
    assert tok.eos_token_id is None and not tok.add_bos


def test_tokenizer_json_gets_config_added_tokens_it_lacks(tmp_path, written):
    d = shutil.copytree(written["qwen2", "json"][0], tmp_path / "no-internvl")
    ids = written["qwen2", "json"][1]
    spec = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in INTERNVL_TOKENS]
    (d / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    tok = load_tokenizer(d)
    assert tok.token_to_id("<IMG_CONTEXT>") == ids["<IMG_CONTEXT>"]
    assert tok.encode("<img><IMG_CONTEXT></img>") == [ids["<img>"], ids["<IMG_CONTEXT>"], ids["</img>"]]
    config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"]["999"] = config["added_tokens_decoder"].pop(str(ids["<img>"]))
    (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer.json gives '</img>' id .*says 484"):
        load_tokenizer(d)


@pytest.mark.parametrize("family,fmt", COMBOS)
def test_ids_past_the_vocabulary_decode_to_nothing(written, family, fmt):
    # Real lm_heads are padded past the tokenizer (Qwen2-0.5B: 151936 rows for 151655 ids).
    tok, _ = _load(written, family, fmt)
    ids = tok.encode("a cat", add_bos=False)
    assert tok.decode(ids + [tok.vocab_size, tok.vocab_size + 100]) == tok.decode(ids) == "a cat"
