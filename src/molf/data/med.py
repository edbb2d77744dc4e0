"""MedMCQA: four-option medical multiple choice; prompt and answer letter as in DESIGN section 4.

Two row layouts share the same field names (``question, opa..opd, cop``) and differ only in the
answer index: the Hugging Face ``openlifescienceai/medmcqa`` dataset uses 0-based ``cop`` (0 = opa),
the original GitHub JSON 1-based (1 = opa). Field names cannot tell them apart, so the base is an
explicit flag (``med_answer_index_base``, default 0); a value impossible under that base (``cop`` 4
with base 0, ``cop`` 0 with base 1) is an error that names the flag to change, never a guess.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from typing import Optional

from molf.data.io import MalformedRecordError, Row, optional, require

HUB_ID = "openlifescienceai/medmcqa"
HUB_TRAIN_SPLIT = "train"
HUB_EVAL_SPLIT = "validation"

LETTERS = ("A", "B", "C", "D")
OPTION_FIELDS = ("opa", "opb", "opc", "opd")
INSTRUCTION = "Answer the medical question below by choosing the correct option letter."


@dataclass(frozen=True)
class MedExample:
    prompt: str
    target: str  # " X": the answer letter after a space, as the model should continue "Answer:"
    answer: str
    question: str
    subject: Optional[str]


def build_prompt(question: str, options: list[str]) -> str:
    lines = [INSTRUCTION, f"Question: {question}", "Options:"]
    lines += [f"{letter}) {option}" for letter, option in zip(LETTERS, options)]
    lines.append("Answer:")
    return "\n".join(lines)


def answer_letter(row: Row, index_base: int) -> str:
    raw = require(row, "cop")
    # An index written as text ("2") or as a whole float (2.0, as CSV/parquet readers give) is fine;
    # 2.7 or a boolean is a broken record, not a guess.
    whole = ((isinstance(raw, str) and re.fullmatch(r"\s*[+-]?\d+(\.0*)?\s*", raw) is not None)
             or (isinstance(raw, float) and raw.is_integer())
             or (isinstance(raw, numbers.Integral) and not isinstance(raw, bool)))
    if not whole:
        raise MalformedRecordError(f"{row.where}: field 'cop' must be an integer answer index, got {raw!r}")
    cop = int(float(raw)) if isinstance(raw, str) else int(raw)
    index = cop - index_base
    if not 0 <= index < len(LETTERS):
        hint = ""
        if index_base == 0 and cop == 4:
            hint = "; this looks like the original 1-based layout: pass --med_answer_index_base 1"
        elif index_base == 1 and cop == 0:
            hint = "; this looks like the 0-based Hugging Face layout: pass --med_answer_index_base 0"
        raise MalformedRecordError(
            f"{row.where}: field 'cop' = {cop} is not a valid answer with med_answer_index_base={index_base}{hint}")
    return LETTERS[index]


def parse_row(row: Row, index_base: int) -> MedExample:
    question = str(require(row, "question")).strip()
    options = [str(require(row, field)).strip() for field in OPTION_FIELDS]
    letter = answer_letter(row, index_base)
    subject = optional(row, "subject_name")
    return MedExample(prompt=build_prompt(question, options), target=f" {letter}", answer=letter,
                      question=question, subject=str(subject) if subject else None)


def parse_rows(rows: list[Row], index_base: int) -> list[MedExample]:
    if index_base not in (0, 1):
        raise ValueError(f"med_answer_index_base must be 0 (Hugging Face layout) or 1 (original layout), "
                         f"got {index_base}")
    return [parse_row(row, index_base) for row in rows]
