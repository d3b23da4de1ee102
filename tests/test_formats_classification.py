"""Classification as multiple choice: InternVL's MCQ prompt and mapping answers back to labels."""
from __future__ import annotations

import pytest

from edgevl.formats.classification import UNPARSED, multiple_choice_prompt, parse_choice

LABELS = ["normal", "pneumonia", "COVID-19", "tuberculosis"]


def test_prompt_is_internvl_mcq_format():
    assert multiple_choice_prompt("What does the X-ray show?", LABELS) == (
        "What does the X-ray show?\nA. normal\nB. pneumonia\nC. COVID-19\nD. tuberculosis\n"
        "Answer with the option's letter from the given choices directly.")


@pytest.mark.parametrize("answer, label", [
    ("pneumonia", "pneumonia"),            # exact
    ("  COVID-19 ", "COVID-19"),           # exact after trimming
    ("Pneumonia.", "pneumonia"),           # case / trailing period
    ("covid-19", "COVID-19"),
    ("Tuber culosis", UNPARSED),           # spaces inside a word are not forgiven
    ("  NORMAL  ", "normal"),
    ("B", "pneumonia"), ("b", "pneumonia"), ("(C)", "COVID-19"), ("D.", "tuberculosis"),
    ("A. normal", "normal"), ("C) COVID-19", "COVID-19"), ("B: pneumonia", "pneumonia"),
    ("E", UNPARSED),                       # no option E
    ("a cat", UNPARSED),                   # lowercase word, not option A
    ("I am not sure", UNPARSED), ("", UNPARSED), (None, UNPARSED),
])
def test_answers_map_back_to_labels(answer, label):
    assert parse_choice(answer, LABELS) == label


def test_multiword_labels_ignore_case_and_spacing():
    labels = ["dense  residential", "parking lot"]
    assert parse_choice("Dense Residential", labels) == "dense  residential"
    assert parse_choice("PARKING   LOT", labels) == "parking lot"


@pytest.mark.parametrize("labels, words", [([], "1 to 26"), (["a", ""], "labels[1]"), (["Cat", "cat "], "labels[0]"),
                                          ([str(i) for i in range(27)], "got 27")])
def test_bad_label_sets_are_named(labels, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        multiple_choice_prompt("q", labels)
