"""A model directory's tokenizer, loaded without transformers or torch.

The reference is what InternVL's own chat() runs: `AutoTokenizer.from_pretrained(path,
trust_remote_code=True, use_fast=False)` with transformers 4.37-4.44, i.e. the *slow* tokenizers
(Qwen2Tokenizer, InternLM2Tokenizer, LlamaTokenizer for Phi-3). Three on-disk formats, looked for
in this order:

1. `tokenizer.json` (HF fast format): run as written by the `tokenizers` library. BOS comes from
   `add_bos_token` in tokenizer_config.json when present, else from the file's post_processor.
2. `tokenizer.model` (sentencepiece; InternVL2-2B / Mini-InternVL-Chat-2B-V1-5 ship InternLM2's,
   InternVL2-4B / 4B-V1-5 ship Phi-3's): the slow tokenizers' algorithm is reproduced on top of the
   sentencepiece library, see `_SentencePieceBackend`. BOS from `add_bos_token`, default True.
3. `vocab.json` + `merges.txt` (Qwen2's byte-level BPE): assembled into the same `tokenizers`
   pipeline transformers' Qwen2Tokenizer builds. No BOS unless `add_bos_token` says so.

Added tokens (`added_tokens_decoder` in tokenizer_config.json, then `added_tokens.json`) are matched
in the text before normal tokenization, with their lstrip/rstrip flags, and may rename pieces
inside the base vocabulary (InternLM2's `<|im_start|>` is the model's `[UNUSED_TOKEN_146]`).

`encode` matches them anywhere in the text, as the reference does. `split_special` + `encode_parts` take a
prompt in parts instead, so that only the parts that are meant to carry tokens (a chat template's) do: in a
text part an added token's string is ordinary characters, tokenized as the pieces it is made of.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

SPIECE_UNDERLINE = "▁"
# transformers' Qwen2Tokenizer PRETOKENIZE_REGEX (identical in the slow 4.37 class and the v5 class).
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                           r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
_FORMATS = "tokenizer.json, tokenizer.model, or vocab.json + merges.txt"
# What the tokenizers library's lstrip/rstrip take (Rust's char::is_whitespace): str.isspace() without the
# information separators U+001C-U+001F, which the slow (Python) tokenizers do strip. None is above U+3000.
_RUST_WHITESPACE = "".join(c for c in map(chr, range(0x3001)) if c.isspace() and not "\x1c" <= c <= "\x1f")


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be loaded, or a token it does not have."""


@dataclass(frozen=True)
class AddedToken:
    content: str
    special: bool = False
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False


class Tokenizer:
    """encode/decode for one model directory; build it with `load_tokenizer`."""

    def __init__(self, backend, *, source: Path, bos_token_id: int | None, eos_token_id: int | None,
                 add_bos: bool, special_ids: frozenset[int]):
        self._backend = backend
        self.source = source
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos = bool(add_bos and bos_token_id is not None)
        self.special_ids = special_ids
        self.vocab_size = backend.vocab_size

    @property
    def format(self) -> str:
        """Which file it was read from: "tokenizer.json", "tokenizer.model" or "vocab.json+merges.txt"."""
        return self._backend.kind

    def __repr__(self) -> str:
        return (f"Tokenizer({self._backend.kind}, {str(self.source)!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_token_id}, eos={self.eos_token_id}, add_bos={self.add_bos})")

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; added tokens written in it map to their ids. BOS first iff add_bos
        (default: self.add_bos, what the reference does with add_special_tokens=True)."""
        return self._with_bos(self._backend.encode(text), add_bos)

    def split_special(self, text: str, only=None) -> list:
        """`text` as encode() reads it: text pieces (str) and the ids (int) of the added tokens written in it;
        only=[token strings]: match just those (the ones this tokenizer has), leave the rest text."""
        return self._backend.matcher.split(text, only)

    def encode_parts(self, parts, add_bos: bool | None = None) -> list[int]:
        """Token ids of a text given in parts: an int is a token id, put in as is; a str is plain text, an added
        token's string in it tokenized as ordinary characters. Adjacent strs are tokenized as one text, and the
        lstrip/rstrip flag of an id's added token takes the whitespace beside it, so split_special(text) gives
        encode(text) back; with a text part that spells no added token, so does any split of it."""
        return self._with_bos(self._backend.encode_parts(list(parts)), add_bos)

    def _with_bos(self, ids: list[int], add_bos: bool | None) -> list[int]:
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_token_id is None:
                raise TokenizerError(f"{self.source}: add_bos requested but the tokenizer has no BOS token")
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"token {token!r} is not in the tokenizer of {self.source}")
        return token_id

    def id_to_token(self, token_id: int) -> str:
        return self._backend.id_to_token(int(token_id))


# -- loading ---------------------------------------------------------------------------------------------

def load_tokenizer(model_dir) -> Tokenizer:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise TokenizerError(f"tokenizer directory {model_dir} does not exist")
    config = _read_json(model_dir / "tokenizer_config.json")
    special_map = _read_json(model_dir / "special_tokens_map.json")
    names = _special_names(config, special_map)
    added = _added_tokens(model_dir, config, names)
    if (model_dir / "tokenizer.json").is_file():
        backend = _tokenizers_backend(model_dir / "tokenizer.json", added)
    elif (model_dir / "tokenizer.model").is_file():
        backend = _SentencePieceBackend(model_dir / "tokenizer.model", added, config, names)
    elif (model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file():
        backend = _qwen2_bpe_backend(model_dir, added)
    else:
        raise TokenizerError(f"no tokenizer in {model_dir}: looked for {_FORMATS}")

    def token_id(role):
        content = names.get(role)
        return None if content is None else backend.token_to_id(content)

    bos, eos = token_id("bos_token"), token_id("eos_token")
    if "add_bos_token" in config:
        add_bos = bool(config["add_bos_token"])
    elif backend.kind == "tokenizer.json":
        add_bos = backend.post_processor_adds(bos)
    else:  # the slow InternLM2/Llama classes default to True; Qwen2 has no BOS at all
        add_bos = backend.kind == "tokenizer.model"
    special = {i for i, tok in added.items() if tok.special}
    special |= {i for i in (token_id(r) for r in ("bos_token", "eos_token", "unk_token", "pad_token"))
                if i is not None}
    special |= backend.special_ids()
    return Tokenizer(backend, source=model_dir, bos_token_id=bos, eos_token_id=eos, add_bos=add_bos,
                     special_ids=frozenset(special))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from None


def _content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_names(config: dict, special_map: dict) -> dict:
    names = {}
    for role in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config[role] if role in config else special_map.get(role)
        names[role] = _content(value)
    extra = config.get("additional_special_tokens") or special_map.get("additional_special_tokens") or []
    names["additional"] = {c for c in map(_content, extra) if c}
    return names


def _added_tokens(model_dir: Path, config: dict, names: dict) -> dict[int, AddedToken]:
    added = {}
    decoder = config.get("added_tokens_decoder") or {}
    for key, spec in decoder.items():
        try:
            added[int(key)] = AddedToken(spec["content"], bool(spec.get("special", False)),
                                         bool(spec.get("lstrip", False)), bool(spec.get("rstrip", False)),
                                         bool(spec.get("normalized", False)))
        except (KeyError, TypeError, ValueError):
            raise TokenizerError(f"{model_dir / 'tokenizer_config.json'}: added_tokens_decoder[{key!r}] "
                                 f"needs an integer id and a 'content'") from None
    # added_tokens.json ({content: id}) is what the slow save_pretrained writes; entries also in the
    # decoder keep the decoder's flags. Special iff named as a special token, as the slow loader does.
    special_names = {names[r] for r in ("bos_token", "eos_token", "unk_token", "pad_token")} | names["additional"]
    for content, token_id in _read_json(model_dir / "added_tokens.json").items():
        if int(token_id) not in added:
            added[int(token_id)] = AddedToken(content, special=content in special_names)
    return added


# -- tokenizer.json and vocab.json + merges.txt: the `tokenizers` library --------------------------------

class _TokenizersBackend:
    def __init__(self, tokenizer, kind: str):
        self._tok = tokenizer
        self.kind = kind
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self.matcher = _AddedTokens(tokenizer.get_added_tokens_decoder(), _RUST_WHITESPACE)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_parts(self, parts: list) -> list[int]:
        # The library tokenizes the text between two added tokens on its own, so each text run goes through
        # the same pipeline without added tokens; only a Metaspace "first" prefix depends on where it stands.
        ids = []
        for position, part in enumerate(self.matcher.strip(_join_text(parts))):
            if isinstance(part, int):
                ids.append(part)
            elif part:
                plain = self._plain_at_start if position == 0 else self._plain_after_token
                ids += plain.encode(part, add_special_tokens=False).ids
        return ids

    @functools.cached_property
    def _plain_at_start(self):
        return _plain_tokenizer(self._tok, self._tok.pre_tokenizer)

    @functools.cached_property
    def _plain_after_token(self):
        return _plain_tokenizer(self._tok, _without_first_prefix(self._tok.pre_tokenizer))

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id)

    def special_ids(self) -> set[int]:
        return {i for i, tok in self._tok.get_added_tokens_decoder().items() if tok.special}

    def post_processor_adds(self, bos: int | None) -> bool:
        if bos is None:
            return False
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        return full[:1] == [bos] and full[1:len(plain) + 1] == plain


def _plain_tokenizer(tok, pre_tokenizer):
    """`tok`'s normalizer and model behind `pre_tokenizer`, with no added tokens: their strings are text."""
    from tokenizers import Tokenizer as HFTokenizer

    plain = HFTokenizer(tok.model)
    plain.normalizer = tok.normalizer
    plain.pre_tokenizer = pre_tokenizer
    return plain


def _without_first_prefix(pre_tokenizer):
    """The pre-tokenizer with Metaspace prepend_scheme "first" made "never": "first" prefixes "▁" only to the
    text at offset 0 of the input, and text after an added token is never there."""
    if pre_tokenizer is None:
        return None
    spec = json.loads(pre_tokenizer.__getstate__())
    changed = _never_prepend(spec)
    if changed == spec:
        return pre_tokenizer
    from tokenizers import Tokenizer as HFTokenizer

    holder = {"version": "1.0", "pre_tokenizer": changed, "model": {"type": "WordLevel", "vocab": {}, "unk_token": ""}}
    return HFTokenizer.from_str(json.dumps(holder)).pre_tokenizer


def _never_prepend(spec):
    if isinstance(spec, list):
        return [_never_prepend(s) for s in spec]
    if not isinstance(spec, dict):
        return spec
    spec = {k: _never_prepend(v) for k, v in spec.items()}
    if spec.get("type") == "Metaspace" and spec.get("prepend_scheme") == "first":
        spec["prepend_scheme"] = "never"
    return spec


def _tokenizers_backend(path: Path, added: dict[int, AddedToken]) -> _TokenizersBackend:
    """tokenizer.json as written, plus any added token of tokenizer_config.json / added_tokens.json it
    lacks (as transformers adds them), at the id the config gives."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_file(str(path))
        missing = {i: t for i, t in added.items() if tok.token_to_id(t.content) is None}
        if missing:
            spec = json.loads(path.read_text(encoding="utf-8"))
            spec["added_tokens"] = (spec.get("added_tokens") or []) + [
                {"id": i, "content": t.content, "single_word": False, "lstrip": t.lstrip, "rstrip": t.rstrip,
                 "normalized": t.normalized, "special": t.special} for i, t in sorted(missing.items())]
            tok = HFTokenizer.from_str(json.dumps(spec))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(f"{path} could not be read by the tokenizers library: {e}") from None
    _check_added_ids(tok, added, path)
    return _TokenizersBackend(tok, "tokenizer.json")


def _check_added_ids(tok, added: dict[int, AddedToken], path: Path) -> None:
    # tokenizers numbers added tokens that are not in the model's vocab consecutively after it,
    # whatever id the file states; a config with gaps cannot be reproduced, so say so.
    for token_id, token in sorted(added.items()):
        if tok.token_to_id(token.content) != token_id:
            raise TokenizerError(f"{path} gives {token.content!r} id {tok.token_to_id(token.content)}, but "
                                 f"{path.parent / 'tokenizer_config.json'} (or added_tokens.json) says {token_id}")


def _qwen2_bpe_backend(model_dir: Path, added: dict[int, AddedToken]) -> _TokenizersBackend:
    """The pipeline of transformers' Qwen2Tokenizer: NFC, the Qwen2 regex split, byte-level BPE."""
    from tokenizers import Tokenizer as HFTokenizer

    vocab = _read_json(model_dir / "vocab.json")
    lines = (model_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines if line and not line.startswith("#version")]
    spec = {
        "version": "1.0",
        "added_tokens": [{"id": i, "content": t.content, "single_word": False, "lstrip": t.lstrip,
                          "rstrip": t.rstrip, "normalized": t.normalized, "special": t.special}
                         for i, t in sorted(added.items())],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_PRETOKENIZE_REGEX}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": merges},
    }
    try:
        tok = HFTokenizer.from_str(json.dumps(spec))
    except Exception as e:
        raise TokenizerError(f"{model_dir}: vocab.json + merges.txt do not form a BPE model: {e}") from None
    _check_added_ids(tok, added, model_dir / "vocab.json")
    return _TokenizersBackend(tok, "vocab.json+merges.txt")


# -- tokenizer.model: the slow sentencepiece tokenizers -------------------------------------------------

class _SentencePieceBackend:
    """What the slow InternLM2Tokenizer / LlamaTokenizer (transformers 4.37-4.44) compute.

    Both split the text on added tokens first (a token with rstrip eats the whitespace after it,
    lstrip the whitespace before it; Phi-3 marks its role tokens rstrip, so "<|user|>\\n" loses the
    newline), then run sentencepiece on each piece of text:
    - InternLM2Tokenizer: `sp_model.encode(piece)` with the model's own normalizer settings.
    - LlamaTokenizer, legacy=True (the default when tokenizer_config.json does not say): the same.
    - LlamaTokenizer, legacy=False: sentencepiece's dummy prefix is switched off; instead "▁" is put
      once before the whole text, and a piece that starts with a space is encoded behind the unk
      token, which is then cut off (so the space survives). A lone "▁" before a special token is dropped.
    Decoding: added tokens map to their content (special ones skipped when asked), and each run of
    ordinary ids goes through sentencepiece as the slow classes do (see `_decode_run`).
    """

    kind = "tokenizer.model"

    def __init__(self, path: Path, added: dict[int, AddedToken], config: dict, names: dict):
        try:
            import sentencepiece as spm
        except ImportError:
            raise ImportError(f"{path} is a sentencepiece model; reading it needs the sentencepiece package: "
                              f"pip install sentencepiece") from None
        model = self._model = path.read_bytes()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model)
        except Exception as e:  # RuntimeError / OSError depending on the sentencepiece version
            raise TokenizerError(f"{path} is not a sentencepiece model: {e}") from None
        self.added = added
        self._added_ids = {t.content: i for i, t in added.items()}
        self.tokenizer_class = config.get("tokenizer_class", "")
        self.internlm2 = self.tokenizer_class.startswith("InternLM2")
        self.legacy = self.internlm2 or config.get("legacy") is None or bool(config.get("legacy"))
        self.add_prefix_space = bool(config.get("add_prefix_space", True))
        self.clean_up = bool(config.get("clean_up_tokenization_spaces", False))
        self.unk_token = names.get("unk_token") or self._sp.id_to_piece(self._sp.unk_id())
        if not self.legacy:
            self._sp = spm.SentencePieceProcessor(model_proto=sp_model_without_dummy_prefix(model))
            self._unk_length = len(self._sp.encode(self.unk_token))
        special = {t.content for t in added.values() if t.special}
        special |= {names[r] for r in ("bos_token", "eos_token", "unk_token", "pad_token") if names.get(r)}
        self._special_contents = special | names["additional"]
        self.matcher = _AddedTokens(added, whitespace=None)
        self.vocab_size = max([self._sp.get_piece_size(), *(i + 1 for i in added)])

    def special_ids(self) -> set[int]:
        return set()

    def token_to_id(self, token: str) -> int | None:
        if token in self._added_ids:
            return self._added_ids[token]
        token_id = self._sp.piece_to_id(token)
        if token_id in self.added or self._sp.id_to_piece(token_id) != token:
            return None  # unknown piece, or a piece an added token renames
        return token_id

    def id_to_token(self, token_id: int) -> str:
        if token_id in self.added:
            return self.added[token_id].content
        return self._sp.id_to_piece(token_id)

    # encode

    def encode(self, text: str) -> list[int]:
        if not self.legacy:  # before matching added tokens, as the slow class does
            text = text.replace(SPIECE_UNDERLINE, " ")
        return self._encode(self.matcher.split(text), self._sp)

    def encode_parts(self, parts: list) -> list[int]:
        return self._encode(parts, self._sp_plain)

    def _encode(self, parts: list, sp) -> list[int]:
        parts = _join_text(parts)
        if not parts:
            return []
        if not self.legacy:
            parts = [p.replace(SPIECE_UNDERLINE, " ") if isinstance(p, str) else p for p in parts]
            if self.add_prefix_space:
                parts = _join_text([SPIECE_UNDERLINE, *parts])
        ids = []
        for part in self.matcher.strip(parts):
            ids.extend([part] if isinstance(part, int) else self._encode_text(part, sp))
        if (not self.legacy and len(ids) > 1 and self.id_to_token(ids[0]) == SPIECE_UNDERLINE
                and self.id_to_token(ids[1]) in self._special_contents):
            ids = ids[1:]
        return ids

    def _encode_text(self, text: str, sp) -> list[int]:
        if not text:
            return []
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return sp.encode(text)
        ids = sp.encode(self.unk_token + text)
        return ids[self._unk_length:] if len(ids) >= self._unk_length else ids

    @functools.cached_property
    def _sp_plain(self):
        """The model with the pieces that added tokens rename made control pieces: sentencepiece matches a
        user-defined piece wherever its string is written (InternLM2's "[UNUSED_TOKEN_146]" would be
        <|im_start|>), a control piece never."""
        import sentencepiece as spm

        model = sp_model_with_control_pieces(self._model, set(self.added))
        if not self.legacy:
            model = sp_model_without_dummy_prefix(model)
        return spm.SentencePieceProcessor(model_proto=model)

    # decode

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        out, run = [], []
        for token_id in ids:
            token = self.added.get(token_id)
            if token is None and not 0 <= token_id < self._sp.get_piece_size():
                continue  # an id past the vocabulary (a padded lm_head): dropped, as tokenizers does
            if token is None and self._sp.is_control(token_id):
                token = AddedToken(self._sp.id_to_piece(token_id), special=True)
            if token is None:
                run.append(token_id)
                continue
            if skip_special_tokens and (token.special or token.content in self._special_contents):
                continue
            out.append(self._decode_run(run))
            out.append(token.content)
            run = []
        out.append(self._decode_run(run))
        return "".join(out)

    def _decode_run(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self.internlm2:
            # InternLM2Tokenizer.convert_tokens_to_string: sp_model.decode, then clean_up_tokenization
            # unconditionally (its prefix-space step adds a space and cuts it off again).
            return clean_up_tokenization(self._sp.decode(ids))
        pieces = [self._sp.id_to_piece(i) for i in ids]
        # LlamaTokenizer.convert_tokens_to_string drops the first piece's "▁" (the prefix it added).
        if self.add_prefix_space and pieces[0].startswith(SPIECE_UNDERLINE):
            pieces[0] = pieces[0][1:]
            if not pieces[0]:
                pieces = pieces[1:]
        text = self._sp.decode(pieces)
        return clean_up_tokenization(text) if self.clean_up else text


class _AddedTokens:
    """A tokenizer's added tokens as its library matches them in text: leftmost-longest (transformers' Trie,
    tokenizers' aho-corasick), then a token's lstrip/rstrip takes the whitespace on that side of it."""

    def __init__(self, tokens: dict, whitespace: str | None):
        self.ids = {t.content: i for i, t in tokens.items() if t.content}
        self._strips = {i: (t.lstrip, t.rstrip) for i, t in tokens.items()}
        self._whitespace = whitespace  # None: str.isspace()
        self._pattern = _token_pattern(tuple(self.ids))

    def split(self, text: str, only=None) -> list:
        """Non-empty text pieces and added-token ids, in order; no stripping yet."""
        pattern = self._pattern if only is None else _token_pattern(tuple(t for t in only if t in self.ids))
        if pattern is None:
            return [text]
        parts, pos = [], 0
        for match in pattern.finditer(text):
            parts += [text[pos:match.start()], self.ids[match.group()]]
            pos = match.end()
        parts.append(text[pos:])
        return [p for p in parts if p != ""]

    def strip(self, parts: list) -> list:
        parts = list(parts)
        for i, part in enumerate(parts):
            if not isinstance(part, int):
                continue
            lstrip, rstrip = self._strips.get(part, (False, False))
            if rstrip and i + 1 < len(parts) and isinstance(parts[i + 1], str):
                parts[i + 1] = parts[i + 1].lstrip(self._whitespace)
            if lstrip and i > 0 and isinstance(parts[i - 1], str):
                parts[i - 1] = parts[i - 1].rstrip(self._whitespace)
        return parts


@functools.lru_cache(maxsize=64)
def _token_pattern(contents: tuple[str, ...]) -> re.Pattern | None:
    # Longest first: the regex takes the first alternative that matches at the leftmost position.
    contents = sorted(set(contents), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, contents))) if contents else None


def _join_text(parts) -> list:
    """Adjacent text pieces joined into one, empty ones dropped: ids are kept as they are."""
    joined = []
    for part in parts:
        if isinstance(part, str) and joined and isinstance(joined[-1], str):
            joined[-1] += part
        elif part != "":
            joined.append(part)
    return joined


def clean_up_tokenization(text: str) -> str:
    """transformers' PreTrainedTokenizerBase.clean_up_tokenization."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


# -- the few protobuf bytes we touch in a sentencepiece ModelProto -----------------------------------------
# ModelProto: pieces = 1, trainer_spec = 2, normalizer_spec = 3; NormalizerSpec.add_dummy_prefix = 3.
# Written by hand so that neither the runtime nor the test writer needs the protobuf package.

def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def proto_fields(buf: bytes):
    """(field number, wire type, value, start, end) of each top-level field; value is an int for
    varints and the payload bytes for length-delimited fields."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value, start, pos


def sp_add_dummy_prefix(model: bytes) -> bool:
    flag = True  # the proto default
    for field, wire, value, _, _ in proto_fields(model):
        if field == 3 and wire == 2:
            for sub_field, sub_wire, sub_value, _, _ in proto_fields(value):
                if sub_field == 3 and sub_wire == 0:
                    flag = bool(sub_value)
    return flag


def sp_model_with_control_pieces(model: bytes, ids) -> bytes:
    """The same model with its USER_DEFINED pieces (type 4) among `ids` made CONTROL pieces (type 3).
    ModelProto.pieces = 1; SentencePiece.type = 3; a later field wins."""
    out, index = bytearray(), 0
    for field, wire, value, start, end in proto_fields(model):
        if field == 1 and wire == 2:
            if index in ids and _piece_type(value) == 4:
                piece = value + b"\x18\x03"
                out += b"\x0a" + _varint(len(piece)) + piece
            else:
                out += model[start:end]
            index += 1
        else:
            out += model[start:end]
    return bytes(out)


def _piece_type(piece: bytes) -> int:
    kind = 1  # NORMAL, the proto default
    for field, wire, value, _, _ in proto_fields(piece):
        if field == 3 and wire == 0:
            kind = value
    return kind


def sp_model_without_dummy_prefix(model: bytes) -> bytes:
    """The same model with normalizer_spec.add_dummy_prefix = false (a later field wins in protobuf)."""
    out, patched = bytearray(), False
    for field, wire, value, start, end in proto_fields(model):
        if field == 3 and wire == 2 and not patched:
            spec = value + b"\x18\x00"
            out += b"\x1a" + _varint(len(spec)) + spec
            patched = True
        else:
            out += model[start:end]
    if not patched:
        out += b"\x1a\x02\x18\x00"
    return bytes(out)
