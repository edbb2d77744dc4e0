"""Train/eval overlap: questions present in both sets, reported and optionally dropped from training.

Questions are compared after collapsing whitespace and lower-casing, the same key the shared SQL
data was split with, so "How many singers do we have?" matches "how many  singers do we have?".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, TypeVar

Example = TypeVar("Example")


def normalize_question(question: str) -> str:
    return " ".join(question.split()).lower()


@dataclass(frozen=True)
class OverlapReport:
    num_train: int
    num_eval: int
    shared_questions: tuple[str, ...]  # normalized, sorted
    num_train_rows_affected: int

    def summary(self) -> str:
        return (f"{len(self.shared_questions)} question(s) appear in both training ({self.num_train} rows) and "
                f"evaluation ({self.num_eval} rows) data, {self.num_train_rows_affected} training row(s) affected")


def find_overlap(train: Sequence[Example], evaluation: Sequence[Example]) -> OverlapReport:
    """Report the training examples whose ``question`` also occurs in ``evaluation``."""
    eval_keys = {normalize_question(example.question) for example in evaluation}
    train_keys = [normalize_question(example.question) for example in train]
    shared = sorted(set(train_keys) & eval_keys)
    affected = sum(key in eval_keys for key in train_keys)
    return OverlapReport(len(train), len(evaluation), tuple(shared), affected)


def drop_overlap(train: Sequence[Example], evaluation: Sequence[Example]) -> tuple[list[Example], OverlapReport]:
    """Training examples without the questions of ``evaluation``, and the report of what was dropped."""
    report = find_overlap(train, evaluation)
    shared = set(report.shared_questions)
    kept = [example for example in train if normalize_question(example.question) not in shared]
    return kept, report
