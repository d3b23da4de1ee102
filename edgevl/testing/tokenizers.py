"""Small tokenizers in the real on-disk formats of InternVL2's three LLM families, for tests.

`write_tokenizer(dir, family, fmt)` trains a tiny model (<= 512 ids in all, so a tiny random model can
use it) on a fixed English + Chinese + emoji corpus with the libraries' own trainers, deterministically
and in well under a second, and writes the files the real checkpoint has beside it. Special tokens are
the family's real strings at the real relative positions:

- qwen2 (InternVL2-1B): byte-level BPE; `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` right after the
  BPE vocabulary (151643-151645 in Qwen2), no BOS (bos_token null), eos `<|im_end|>` (Qwen2-*-Instruct),
  pad `<|endoftext|>`. Formats: "json" (tokenizer.json plus vocab.json/merges.txt, as Qwen2 ships) and
  "bpe-files" (vocab.json + merges.txt + added_tokens.json, what a slow save_pretrained writes).
- internlm2 (InternVL2-2B, Mini-InternVL-Chat-2B-V1-5): sentencepiece BPE with byte fallback, <unk>=0,
  <s>=1, </s>=2; the model's last six pieces are placeholders that tokenizer_config.json's
  added_tokens_decoder renames (92538 <|plugin|>, 92539 <|interpreter|>, 92540 <|action_end|>,
  92541 <|action_start|>, 92542 <|im_end|>, 92543 <|im_start|>); add_bos_token true, add_eos_token
  false, pad </s>. Source: InternLM2-chat's tokenizer_config.json as quoted in OpenPPL/ppl.pmx
  (ConvertTokenizerModel.py, which renames those pieces the same way), and the InternLM2Tokenizer
  defaults in OpenGVLab/InternVL internvl_chat/internvl/model/internlm2/tokenization_internlm2.py.
  add_dummy_prefix is false in our model (believed to match InternLM2's; the loader reads the flag).
- phi3 (InternVL2-4B, Mini-InternVL-Chat-4B-V1-5): Llama-style sentencepiece BPE with byte fallback and
  a dummy prefix; added 32000-32010 = <|endoftext|>, <|assistant|>, <|placeholder1-4|>, <|system|>,
  <|end|>, <|placeholder5-6|>, <|user|> (ids from torchtune's PHI3_SPECIAL_TOKENS), role tokens and
  </s> with rstrip=true and </s> not special, eos <|endoftext|>, legacy false (Phi-3-mini's
  tokenizer_config.json). add_bos_token true: InternVL's preprocess_phi3 (internvl_chat/internvl/train/
  dataset.py) masks exactly one leading BOS (`cur_len = 1`, turn lengths minus one), so the Phi-3
  tokenizer InternVL trained with added <s>; later Phi-3 releases switched it off.

All three then carry InternVL's added tokens in InternVL's order (internvl_chat/internvl/train/
constants.py; `tokenizer.add_tokens(token_list, special_tokens=True)` in internvl_chat_finetune.py):
<img>, </img>, <IMG_CONTEXT>, <quad>, </quad>, <ref>, </ref>, <box>, </box> (InternLM2: 92544...).
"""
from __future__ import annotations

import io
import json
import struct
from pathlib import Path

from ..tokenizer import QWEN2_PRETOKENIZE_REGEX, SPIECE_UNDERLINE, sp_add_dummy_prefix

INTERNVL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
FAMILY_FORMATS = {"qwen2": ("json", "bpe-files"), "internlm2": ("json", "sentencepiece"),
                  "phi3": ("json", "sentencepiece")}
QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
INTERNLM2_RENAMED = ("<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>",
                     "<|im_start|>")
PHI3_ADDED = ("<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
              "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>")
BASE_VOCAB_SIZE = 480  # trained pieces, bytes included; added tokens come on top (<= 512 in all)

CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "Please describe the image in detail.",
    "What is in the picture? A cat is sitting on a red sofa next to the window.",
    "There are 3 cars and 12 people in the street, and the traffic light is green.",
    "user\nDescribe this image.\nassistant\nThe image shows a busy street at night.",
    "system\nYou are a helpful assistant. Answer the questions.",
    "Image-1: \nImage-2: \nWhat are the differences between the two images?",
    "Frame1: \nFrame2: \nWhat happens in the video?",
    "Please provide the bounding box coordinate of the region this sentence describes: the dog",
    "CAM_FRONT CAM_FRONT_LEFT CAM_FRONT_RIGHT CAM_BACK CAM_BACK_LEFT CAM_BACK_RIGHT",
    "[[100, 200, 300, 400]] [[12, 34, 567, 890]]",
    "请详细描述这张图片。",
    "图片中有一只猫坐在红色的沙发上，旁边是窗户。",
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。",
    "你好，世界！今天天气很好。",
    "这是一张城市街道的照片，有很多汽车和行人。",
    "I love 🐱 and 🚗 and 🌧️ 😀👍🏽.",
    "Hello world! How are you today? I'm fine, thanks.",
    "It's a sunny day; the children don't want to go home.",
)


def write_tokenizer(model_dir, family: str, fmt: str = "json") -> dict[str, int]:
    """Write a small `family` tokenizer in format `fmt` into model_dir; return {special token: id}."""
    if family not in FAMILY_FORMATS:
        raise ValueError(f"family={family!r}: expected one of {sorted(FAMILY_FORMATS)}")
    if fmt not in FAMILY_FORMATS[family]:
        raise ValueError(f"{family} checkpoints ship {FAMILY_FORMATS[family]}, not fmt={fmt!r}")
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    if family == "qwen2":
        return _write_qwen2(model_dir, fmt)
    return _write_sentencepiece_family(model_dir, family, fmt)


def _added_entry(content: str, special: bool = True, rstrip: bool = False) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": rstrip, "single_word": False,
            "special": special}


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _tokenizer_json_added(decoder: dict[int, dict]) -> list[dict]:
    return [{"id": i, **{k: e[k] for k in ("content", "single_word", "lstrip", "rstrip", "normalized", "special")}}
            for i, e in sorted(decoder.items())]


# -- qwen2 -----------------------------------------------------------------------------------------------

def _qwen2_pipeline() -> dict:
    return {
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_PRETOKENIZE_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                           "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    }


def _train_byte_level_bpe() -> tuple[dict[str, int], list[str]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer.from_str(json.dumps({"version": "1.0", "added_tokens": [], **_qwen2_pipeline(), "model": {
        "type": "BPE", "vocab": {}, "merges": []}}))
    tok.model = models.BPE()
    trainer = trainers.BpeTrainer(vocab_size=BASE_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, min_frequency=1)
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return model["vocab"], merges


def _write_qwen2(model_dir: Path, fmt: str) -> dict[str, int]:
    vocab, merges = _train_byte_level_bpe()
    ids = {t: len(vocab) + k for k, t in enumerate(QWEN2_SPECIALS + INTERNVL_TOKENS)}
    decoder = {i: _added_entry(t) for t, i in ids.items()}
    extra = ["<|im_start|>", "<|im_end|>", *INTERNVL_TOKENS]
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): e for i, e in decoder.items()},
        "additional_special_tokens": extra,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    _write_json(model_dir / "tokenizer_config.json", config)
    _write_json(model_dir / "special_tokens_map.json", {
        "additional_special_tokens": extra, "eos_token": _added_entry("<|im_end|>"),
        "pad_token": _added_entry("<|endoftext|>")})
    _write_json(model_dir / "vocab.json", vocab)
    (model_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    if fmt == "json":
        _write_json(model_dir / "tokenizer.json", {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": _tokenizer_json_added(decoder),
            **_qwen2_pipeline(),
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": merges}})
    else:
        _write_json(model_dir / "added_tokens.json", ids)
    return ids


# -- internlm2 and phi3: sentencepiece ---------------------------------------------------------------------

def _train_sentencepiece(add_dummy_prefix: bool) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, model_type="bpe", vocab_size=BASE_VOCAB_SIZE,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=add_dummy_prefix, allow_whitespace_only_pieces=True,
        num_threads=1, minloglevel=2)
    return buf.getvalue()


def _append_user_defined_pieces(model: bytes, pieces) -> bytes:
    """Append pieces (type USER_DEFINED = 4, score 0) to a serialized ModelProto: repeated field 1
    occurrences later in the message are appended to the list by any protobuf parser."""
    out = bytearray(model)
    for piece in pieces:
        raw = piece.encode("utf-8")
        msg = b"\x0a" + bytes([len(raw)]) + raw + b"\x15" + struct.pack("<f", 0.0) + b"\x18\x04"
        out += b"\x0a" + bytes([len(msg)]) + msg
    return bytes(out)


def _sp_json_pipeline(family: str, model: bytes) -> dict:
    """What transformers' converters make of the model: InternLM2Converter (normalizer Replace, with
    Prepend only under a dummy prefix) and, for Phi-3 (legacy false), LlamaTokenizer's Metaspace."""
    decoder = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": SPIECE_UNDERLINE}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    if family == "internlm2":
        steps = [{"type": "Prepend", "prepend": SPIECE_UNDERLINE}] if sp_add_dummy_prefix(model) else []
        steps.append({"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_UNDERLINE})
        return {"normalizer": {"type": "Sequence", "normalizers": steps}, "pre_tokenizer": None, "decoder": decoder}
    return {"normalizer": None,
            "pre_tokenizer": {"type": "Metaspace", "replacement": SPIECE_UNDERLINE, "prepend_scheme": "first",
                              "split": False},
            "decoder": decoder}


def _sp_merges(pieces: list[str], scores: list[float]) -> list[list[str]]:
    """transformers' SentencePieceExtractor.extract: every split of a piece into two pieces, by score."""
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = []
    for piece, score in zip(pieces, scores):
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: m[2], reverse=True)
    return [[left, right] for left, right, _ in merges]


def _sp_added_and_config(family: str, size: int) -> tuple[dict[int, dict], dict]:
    """added_tokens_decoder entries by id, and the rest of tokenizer_config.json, for a model of `size` pieces."""
    internlm2 = family == "internlm2"
    decoder = {0: _added_entry("<unk>"), 1: _added_entry("<s>"),
               2: _added_entry("</s>", special=internlm2, rstrip=not internlm2)}
    if internlm2:
        decoder.update({size - 6 + k: _added_entry(t) for k, t in enumerate(INTERNLM2_RENAMED)})
        auto_map = {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                      "tokenization_internlm2_fast.InternLM2TokenizerFast"]}
        config = {"add_bos_token": True, "add_eos_token": False, "auto_map": auto_map, "bos_token": "<s>",
                  "clean_up_tokenization_spaces": False, "decode_with_prefix_space": False, "eos_token": "</s>",
                  "model_max_length": 1000000000000000019884624838656, "pad_token": "</s>",
                  "sp_model_kwargs": None, "tokenizer_class": "InternLM2Tokenizer", "unk_token": "<unk>"}
        extra = ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>", "<|plugin|>"]
    else:
        decoder.update({size + k: _added_entry(t, rstrip=t != "<|endoftext|>") for k, t in enumerate(PHI3_ADDED)})
        config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
                  "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>", "legacy": False,
                  "model_max_length": 131072, "pad_token": "<|endoftext|>", "padding_side": "left",
                  "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>",
                  "use_default_system_prompt": False}
        extra = []
    first = max(size, max(decoder) + 1)
    decoder.update({first + k: _added_entry(t) for k, t in enumerate(INTERNVL_TOKENS)})
    config.update({"added_tokens_decoder": {str(i): e for i, e in sorted(decoder.items())},
                   "additional_special_tokens": extra + list(INTERNVL_TOKENS)})
    return decoder, config


def _sp_tokenizer_json(family: str, model: bytes, decoder: dict[int, dict]) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model)
    size = sp.get_piece_size()
    pieces = [decoder[i]["content"] if i in decoder else sp.id_to_piece(i) for i in range(size)]
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": _tokenizer_json_added(decoder),
        **_sp_json_pipeline(family, model),
        "post_processor": {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": "<s>", "type_id": 1}},
                                    {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {p: i for i, p in enumerate(pieces)},
                  "merges": _sp_merges(pieces, [sp.get_score(i) for i in range(size)])}}


def _write_sentencepiece_family(model_dir: Path, family: str, fmt: str) -> dict[str, int]:
    import sentencepiece as spm

    model = _train_sentencepiece(add_dummy_prefix=family != "internlm2")
    if family == "internlm2":
        model = _append_user_defined_pieces(model, [f"[UNUSED_TOKEN_{141 + k}]" for k in range(6)])
    size = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    decoder, config = _sp_added_and_config(family, size)
    _write_json(model_dir / "tokenizer_config.json", config)
    _write_json(model_dir / "special_tokens_map.json", {
        "additional_special_tokens": config["additional_special_tokens"], "bos_token": _added_entry("<s>"),
        "eos_token": _added_entry(config["eos_token"]), "pad_token": _added_entry(config["pad_token"]),
        "unk_token": _added_entry("<unk>")})
    (model_dir / "tokenizer.model").write_bytes(model)
    _write_json(model_dir / "added_tokens.json", {e["content"]: i for i, e in decoder.items() if i >= size})
    if fmt == "json":
        _write_json(model_dir / "tokenizer.json", _sp_tokenizer_json(family, model, decoder))
    wanted = ["<unk>", "<s>", "</s>", *(("<|im_start|>", "<|im_end|>") if family == "internlm2" else PHI3_ADDED)]
    by_content = {e["content"]: i for i, e in decoder.items()}
    return {t: by_content[t] for t in wanted + list(INTERNVL_TOKENS) if not t.startswith("<|placeholder")}
