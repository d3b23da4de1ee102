"""Classification as a multiple-choice question, the way InternVL evaluates it.

Prompt, from OpenGVLab/InternVL internvl_chat/eval/mmbench/evaluate_mmbench.py (MMBenchDataset.__getitem__
and `prompt['en']`; Mini-InternVL's medical results use the same MCQ style through VLMEvalKit):

    question + '\\nA. first' + '\\nB. second' ... + '\\n'
        + "Answer with the option's letter from the given choices directly."
"""
from __future__ import annotations

import re
import string

MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
UNPARSED = "unparsed"
_LETTERS = string.ascii_uppercase
# "B", "B.", "(B)", "B)", "B: text", "B. text" -- a letter standing alone at the start of the answer.
_LETTER_ANSWER = re.compile(r"^\s*\(?([A-Za-z])\s*(?:[\).:]|$|\s)")


def _check_labels(labels) -> list[str]:
    labels = list(labels)
    if not 1 <= len(labels) <= len(_LETTERS):
        raise ValueError(f"labels: expected 1 to {len(_LETTERS)} labels (one option letter each), got {len(labels)}")
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"labels[{i}]={label!r}: each label must be a non-empty string")
    seen = {}
    for i, label in enumerate(labels):
        key = _normalize(label)
        if key in seen:
            raise ValueError(f"labels[{seen[key]}]={labels[seen[key]]!r} and labels[{i}]={label!r} are the same "
                             "label ignoring case and spaces: answers could not be mapped back")
        seen[key] = i
    return labels


def multiple_choice_prompt(question: str, labels) -> str:
    """The question, one lettered option per label, then InternVL's MCQ instruction."""
    labels = _check_labels(labels)
    options = "".join(f"\n{_LETTERS[i]}. {label}" for i, label in enumerate(labels))
    return f"{question}{options}\n{MCQ_INSTRUCTION}"


def _normalize(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".")


def parse_choice(answer: str, labels) -> str:
    """The label `answer` names: the label exactly, then ignoring case and spaces, then by its option letter
    ("B", "(B)", "B. cat"); UNPARSED when none matches. Never raises on model output."""
    labels = _check_labels(labels)
    text = answer.strip() if isinstance(answer, str) else ""
    if text in labels:
        return text
    by_normalized = {_normalize(label): label for label in labels}
    if _normalize(text) in by_normalized:
        return by_normalized[_normalize(text)]
    match = _LETTER_ANSWER.match(text)
    if match:
        index = _LETTERS.find(match.group(1).upper())
        # A lone lowercase word like "a cat" is not option A: only accept lowercase when it is the whole answer.
        if 0 <= index < len(labels) and (match.group(1).isupper() or len(text.rstrip(".)")) <= 2):
            return labels[index]
    return UNPARSED
