"""MedMCQA answer parsing and scoring."""

from __future__ import annotations

import pytest

from molf.data.med import MedExample
from molf.eval.med import parse_answer, score_med


@pytest.mark.parametrize("text, letter", [(" A", "A"), ("B)", "B"), ("C.", "C"), ("(D)", "D"), ("Answer: A", "A"),
                                          ("answer:B because", "B"), (" C\nmore text", "C"), ("D", "D")])
def test_parser_accepts_the_answer_forms(text, letter):
    assert parse_answer(text) == letter


@pytest.mark.parametrize("text", ["", " a patient", " E", "The answer is A", " Ab", "AB)"])
def test_parser_rejects_non_answers(text):
    assert parse_answer(text) is None


def _example(answer, subject=None):
    return MedExample(prompt="p", target=f" {answer}", answer=answer, question="q", subject=subject)


def test_scores_accuracy_invalid_and_subjects():
    examples = [_example("A", "Anatomy"), _example("B", "Anatomy"), _example("C", "Surgery"), _example("D", "Surgery")]
    metrics, details = score_med(examples, [" A", " C", "(C)", "no idea"])
    assert metrics == {"accuracy": 50.0, "invalid_answers": 1}
    assert details == {"per_subject": {"Anatomy": {"accuracy": 50.0, "num_eval": 2},
                                       "Surgery": {"accuracy": 50.0, "num_eval": 2}}}


def test_wrong_letter_scores_zero_and_no_subjects_no_details():
    metrics, details = score_med([_example("A"), _example("B")], [" B", " A"])
    assert metrics == {"accuracy": 0.0, "invalid_answers": 0} and details == {}
