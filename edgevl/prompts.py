"""Conversation templates, the `<image>` placeholder, and the prompt's expansion into token ids.

Everything here reproduces InternVL's own chat() (OpenGVLab/InternVL, internvl_chat/internvl/model/
internvl_chat/modeling_internvl_chat.py, shipped beside each checkpoint):

    if history is None and pixel_values is not None and '<image>' not in question:
        question = '<image>\\n' + question
    template = get_conv_template(self.template); template.system_message = self.system_message
    ... append history, question, then (roles[1], None); query = template.get_prompt()
    for num_patches in num_patches_list:          # one entry per image, in order
        query = query.replace('<image>', '<img>' + '<IMG_CONTEXT>' * 256 * num_patches + '</img>', 1)
    eos_token_id = tokenizer.convert_tokens_to_ids(template.sep.strip())   # what generation stops on
    response = response.split(template.sep.strip())[0].strip()

Note chat() adds '<image>\\n' only when there is no history; build_query() always does when a
question has no placeholder but images were given (a follow-up question with a new image needs one).

One deliberate difference: chat() tokenizes the whole query string with special tokens parsed, so a
question, answer or system message that spells `<|im_start|>` or `<IMG_CONTEXT>` opens a turn or an image
slot. render_prompt() remembers which text is the template's, and tokenize_prompt() parses special tokens
only there; see `TextChunk` for what stays markup in a question.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_PLACEHOLDER = "<image>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
# InternVL's grounding markup (formats.grounding writes it into questions). Added tokens the model was trained
# on inside questions; they open no turn and no image, so a question keeps them as tokens.
GROUNDING_TOKENS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>")

# conversation.py's default system message for all three templates since the InternVL 2.0 release
# (commit 0dc48a2), which is what InternVL2-1B/2B/4B's chat() uses (self.system_message =
# self.conv_template.system_message).
INTERNVL2_SYSTEM_MESSAGE = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
# The InternVL 1.5 release's conversation.py (commits a08ba33 / 0556aa8), which Mini-InternVL-Chat-2B-V1-5
# and -4B-V1-5 were released with; the same strings are ms-swift's `internvl` / `internvl-phi3` defaults and
# Ascend atb_llm's INTERNVL_SYSTEM_PROMPTS['v1']. Pick them with get_template(name, version="v1.5"), or
# let checkpoint_system_message() read the checkpoint's own conversation.py.
V1_5_SYSTEM_MESSAGES = {
    "Hermes-2": "Answer the questions.",
    "internlm2-chat": "You are an AI assistant whose name is InternLM (书生·浦语).",
    "phi3-chat": "You are an AI assistant whose name is Phi-3.",
}


class PromptError(ValueError):
    """A prompt that does not fit its images or template."""


@dataclass(frozen=True)
class Template:
    """One of InternVL's conversation templates (SeparatorStyle.MPT)."""

    name: str
    system_template: str
    system_message: str
    roles: tuple[str, str]
    sep: str

    @property
    def stop_token(self) -> str:
        return self.sep.strip()


# OpenGVLab/InternVL internvl_chat/internvl/conversation.py (the copy shipped with each checkpoint), all
# sep_style=SeparatorStyle.MPT. No newline follows any sep: '<|im_end|>' is followed directly by the
# next '<|im_start|>' (only the later 'internvl2_5' template uses sep='<|im_end|>\n').
TEMPLATES: dict[str, Template] = {
    # register_conv_template(Conversation(name='Hermes-2', ...)); stop_str '<|endoftext|>' is not used by chat().
    "Hermes-2": Template("Hermes-2", "<|im_start|>system\n{system_message}", INTERNVL2_SYSTEM_MESSAGE,
                         ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>"),
    # register_conv_template(Conversation(name='internlm2-chat', ...))
    "internlm2-chat": Template("internlm2-chat", "<|im_start|>system\n{system_message}", INTERNVL2_SYSTEM_MESSAGE,
                               ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>"),
    # register_conv_template(Conversation(name='phi3-chat', ...))
    "phi3-chat": Template("phi3-chat", "<|system|>\n{system_message}", INTERNVL2_SYSTEM_MESSAGE,
                          ("<|user|>\n", "<|assistant|>\n"), "<|end|>"),
}
VERSIONS = ("internvl2", "v1.5")


def get_template(name: str, version: str = "internvl2") -> Template:
    """The template config.json's `template` names; version="v1.5" gives the system message of the
    Mini-InternVL-Chat-*-V1-5 release instead of InternVL2's."""
    if name not in TEMPLATES:
        raise PromptError(f"unknown template {name!r}: known templates are {', '.join(TEMPLATES)}")
    if version not in VERSIONS:
        raise PromptError(f"unknown template version {version!r}: expected one of {VERSIONS}")
    template = TEMPLATES[name]
    if version == "v1.5":
        template = Template(template.name, template.system_template, V1_5_SYSTEM_MESSAGES[name],
                            template.roles, template.sep)
    return template


def checkpoint_system_message(model_dir, template_name: str) -> str | None:
    """The system message a checkpoint's own chat() uses, read without running its code: config.json's
    `system_message` (newer modeling files prefer it), else the `system_message=` of the template's
    Conversation(...) in the conversation.py shipped beside the weights; None if neither says."""
    from .specs import read_config

    model_dir = Path(model_dir)
    if (model_dir / "config.json").is_file():
        message = read_config(model_dir).get("system_message")
        if isinstance(message, str):
            return message
    source = model_dir / "conversation.py"
    if not source.is_file():
        return None
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except SyntaxError as e:
        raise PromptError(f"{source} does not parse as Python: {e}") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Conversation":
            kwargs = {k.arg: k.value for k in node.keywords}
            name, message = kwargs.get("name"), kwargs.get("system_message")
            if (isinstance(name, ast.Constant) and name.value == template_name
                    and isinstance(message, ast.Constant) and isinstance(message.value, str)):
                return message.value
    return None


# -- text ------------------------------------------------------------------------------------------------

def build_query(question: str, num_images: int) -> str:
    """The user turn for `question` about `num_images` images, with one `<image>` per image."""
    if num_images < 0:
        raise PromptError(f"num_images={num_images} must be >= 0")
    placeholders = question.count(IMAGE_PLACEHOLDER)
    if placeholders == 0:
        if num_images == 1:
            return IMAGE_PLACEHOLDER + "\n" + question
        # InternVL's multi-image convention (README; eval/mantis_eval/evaluate_mantis.py).
        return "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(num_images)) + question
    if num_images == 0:
        raise PromptError(f"the question has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but no images "
                          f"were given: pass the images or remove the placeholders")
    if placeholders != num_images:
        raise PromptError(f"the question has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but "
                          f"{num_images} images were given: use one placeholder per image, or none")
    return question


# Whose text a TextChunk is.
TEMPLATE, QUESTION, USER = "template", "question", "user"


@dataclass(frozen=True)
class TextChunk:
    """A run of a rendered prompt and whose text it is, which decides how it is tokenized:

    - TEMPLATE: the conversation template's own text; its special tokens are parsed.
    - QUESTION: the query and each question of the history. Special tokens written in it are plain characters,
      except InternVL's own prompt markup: `<image>` marks an image (chat()'s placeholder, counted against the
      images given) and GROUNDING_TOKENS stay tokens.
    - USER: the system message and each answer of the history; special tokens in it are plain characters.
    """

    text: str
    kind: str


class RenderedPrompt(str):
    """The prompt text render_prompt() writes, with `chunks` saying whose text each run of it is.

    String operations on it give a plain str, which tokenize_prompt() reads as template text throughout."""

    chunks: tuple[TextChunk, ...]

    def __new__(cls, chunks):
        chunks = tuple(chunks)
        prompt = super().__new__(cls, "".join(c.text for c in chunks))
        prompt.chunks = chunks
        return prompt

    def __getnewargs__(self):
        return (self.chunks,)


def render_prompt(template: Template | str, query: str, history=(),
                  system_message: str | None = None) -> RenderedPrompt:
    """InternVL's Conversation.get_prompt() for SeparatorStyle.MPT: the system turn, each (question,
    answer) of `history`, the query, then the assistant role waiting for its answer."""
    if isinstance(template, str):
        template = get_template(template)
    message = template.system_message if system_message is None else system_message
    before, _, after = template.system_template.partition("{system_message}")
    chunks = [TextChunk(before, TEMPLATE), TextChunk(message, USER), TextChunk(after + template.sep, TEMPLATE)]
    user, assistant = template.roles
    for question, answer in history:
        chunks += _turn(user, question, QUESTION, template.sep) + _turn(assistant, answer, USER, template.sep)
    chunks += _turn(user, query, QUESTION, template.sep) + [TextChunk(assistant, TEMPLATE)]
    return RenderedPrompt(c for c in chunks if c.text)


def _turn(role: str, message, kind: str, sep: str) -> list[TextChunk]:
    # get_prompt() tests `if message:`, so an empty message gets the role alone, without a separator.
    if not message:
        return [TextChunk(role, TEMPLATE)]
    return [TextChunk(role, TEMPLATE), TextChunk(message, kind), TextChunk(sep, TEMPLATE)]


# -- tokens ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageChunk:
    """Where image `index` goes: IMG_START, IMG_CONTEXT x num_tokens, IMG_END."""

    index: int
    num_tiles: int
    num_tokens: int


def prompt_chunks(prompt: str, tiles_per_image, tokens_per_tile: int = 256) -> list:
    """The prompt as text pieces and ImageChunks, in order (llama.cpp mtmd's chunk list). A plain str is cut
    at every `<image>` into str pieces; a RenderedPrompt into TextChunks, at the `<image>`s of its questions."""
    tiles_per_image = [int(t) for t in tiles_per_image]
    pieces = _split_at_placeholders(prompt)
    placeholders = sum(piece is None for piece in pieces)
    if placeholders != len(tiles_per_image):
        raise PromptError(f"the prompt has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but tiles were "
                          f"given for {len(tiles_per_image)} images")
    if tokens_per_tile <= 0 or any(t <= 0 for t in tiles_per_image):
        raise PromptError(f"tiles_per_image={tiles_per_image} and tokens_per_tile={tokens_per_tile} must be positive")
    images = enumerate(tiles_per_image)
    chunks = []
    for piece in pieces:
        if piece is None:
            index, tiles = next(images)
            piece = ImageChunk(index, tiles, tiles * tokens_per_tile)
        chunks.append(piece)
    return chunks


def _split_at_placeholders(prompt) -> list:
    """The prompt's text pieces, with None where an image placeholder stands."""
    chunks = getattr(prompt, "chunks", None)
    if chunks is None:
        return _interleave(prompt.split(IMAGE_PLACEHOLDER))
    pieces = []
    for chunk in chunks:
        if chunk.kind == QUESTION:
            pieces += _interleave([TextChunk(t, QUESTION) for t in chunk.text.split(IMAGE_PLACEHOLDER)])
        else:
            pieces.append(chunk)
    return pieces


def _interleave(texts: list) -> list:
    pieces = [texts[0]]
    for text in texts[1:]:
        pieces += [None, text]
    return pieces


def tokenize_prompt(tokenizer, prompt: str, tiles_per_image, tokens_per_tile: int = 256, *,
                    allow_special_tokens: bool = False) -> np.ndarray:
    """Token ids (int64) of `prompt` with each image placeholder expanded to IMG_START + IMG_CONTEXT x
    (tokens_per_tile * tiles) + IMG_END, without building the expanded string.

    A RenderedPrompt is tokenized by whose text each chunk is (see TextChunk): special tokens come from the
    template alone, so a user's text can open no turn and no image slot. A plain str, or any prompt with
    allow_special_tokens=True, is read as chat() reads it, special tokens parsed everywhere. Where the user's
    text spells no special token, both give the ids of tokenizing the expanded string."""
    if allow_special_tokens or getattr(prompt, "chunks", None) is None:
        chunks = prompt_chunks(str(prompt), tiles_per_image, tokens_per_tile)
        ids = _parsed_ids(tokenizer, chunks)
    else:
        chunks = prompt_chunks(prompt, tiles_per_image, tokens_per_tile)
        ids = _chunk_ids(tokenizer, chunks)
    _check_image_slots(tokenizer, ids, chunks)
    return np.asarray(ids, dtype=np.int64)


def _parsed_ids(tokenizer, chunks: list) -> list[int]:
    """Ids of str pieces and ImageChunks, special tokens parsed in the text.

    Text after an image is tokenized behind IMG_END and that id dropped again, so it starts exactly as
    it does in the full string (a sentencepiece tokenizer adds its "▁" prefix only at the very start)."""
    start, end, context = (tokenizer.token_to_id(t) for t in (IMG_START, IMG_END, IMG_CONTEXT))
    ids = [tokenizer.bos_token_id] if tokenizer.add_bos else []
    for position, chunk in enumerate(chunks):
        if isinstance(chunk, ImageChunk):
            ids += [start, *([context] * chunk.num_tokens), end]
        elif chunk and position > 0:
            after = tokenizer.encode(IMG_END + chunk, add_bos=False)
            if end not in after:
                raise PromptError(f"{IMG_END!r} is not an added token of this tokenizer; cannot place image tokens")
            ids += after[after.index(end) + 1:]  # anything before it is a start-of-text prefix
        elif chunk:
            ids += tokenizer.encode(chunk, add_bos=False)
    return ids


def _chunk_ids(tokenizer, chunks: list) -> list[int]:
    """Ids of TextChunks and ImageChunks. Every chunk becomes plain text and the token ids its kind allows, and
    the whole list is tokenized in one go: text runs on across chunk borders as it does in the full string."""
    start, context, end = _image_token_ids(tokenizer)
    parts = []
    for chunk in chunks:
        if isinstance(chunk, ImageChunk):
            parts += [start, *([context] * chunk.num_tokens), end]
        elif chunk.kind == TEMPLATE:
            parts += tokenizer.split_special(chunk.text)
        elif chunk.kind == QUESTION:
            parts += tokenizer.split_special(chunk.text, only=GROUNDING_TOKENS)
        else:
            parts.append(chunk.text)
    return tokenizer.encode_parts(parts)


def _image_token_ids(tokenizer) -> list[int]:
    ids = tokenizer.split_special(IMG_START + IMG_CONTEXT + IMG_END)
    if len(ids) != 3 or not all(isinstance(i, int) for i in ids):
        raise PromptError(f"{IMG_START}, {IMG_CONTEXT} and {IMG_END} are not all added tokens of the tokenizer in "
                          f"{tokenizer.source}; cannot place image tokens")
    return ids


def _check_image_slots(tokenizer, ids: list[int], chunks: list) -> None:
    # The model's embedding splice fills every IMG_CONTEXT id with image features, so one spelled out in the
    # text is an image slot without an image.
    expected = sum(c.num_tokens for c in chunks if isinstance(c, ImageChunk))
    extra = ids.count(tokenizer.token_to_id(IMG_CONTEXT)) - expected
    if extra:
        raise PromptError(f"the prompt's text spells {IMG_CONTEXT} {extra} time(s), and special tokens are parsed "
                          f"in it, so each would be an image slot without an image: remove {IMG_CONTEXT} from the "
                          f"text, or leave allow_special_tokens off so that typed special tokens stay text")
