"""MedMCQA evaluation: accuracy (%), invalid-answer count, per-subject accuracy when subjects exist."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Optional, Sequence

from molf.data.med import MedExample

# " A", "A)", "A.", "(A)", "Answer: A" (the word "Answer" in any case; the letter must be upper case,
# so that a generated article "a" is not read as option A).
_ANSWER = re.compile(r"^\s*(?:(?i:answer)\s*:\s*)?\(?([ABCD])(?:[).:,]|\s|$)")


def parse_answer(generated: str) -> Optional[str]:
    """The option letter the generation starts with, or None when it names no option."""
    match = _ANSWER.match(generated)
    return match.group(1) if match else None


def per_subject_accuracy(examples: Sequence[MedExample],
                         predicted: Sequence[Optional[str]]) -> dict[str, dict[str, float]]:
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for example, letter in zip(examples, predicted):
        if example.subject:
            totals[example.subject][0] += int(letter == example.answer)
            totals[example.subject][1] += 1
    return {subject: {"accuracy": 100.0 * correct / count, "num_eval": count}
            for subject, (correct, count) in sorted(totals.items())}


def score_med(examples: Sequence[MedExample], generations: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics (accuracy in %, invalid_answers) and details (per-subject accuracy, if any subject names)."""
    predicted = [parse_answer(text) for text in generations]
    correct = sum(letter == example.answer for example, letter in zip(examples, predicted, strict=True))
    metrics = {"accuracy": 100.0 * correct / len(examples) if examples else float("nan"),
               "invalid_answers": sum(letter is None for letter in predicted)}
    subjects = per_subject_accuracy(examples, predicted)
    return metrics, ({"per_subject": subjects} if subjects else {})
