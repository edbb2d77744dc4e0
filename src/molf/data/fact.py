"""CounterFact (Meng et al. 2022): knowledge injection of counterfactual rewrites.

Training teaches ``prompt -> " " + target_new`` with the subject filled in; evaluation scores the
same rewrites. Two layouts load:

- EasyEdit: ``prompt`` (subject filled in), ``subject``, ``target_new``, ``ground_truth``,
  ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``.
- Original ROME: ``requested_rewrite{prompt (with "{}"), subject, target_new{str}, target_true{str}}``,
  ``paraphrase_prompts``, ``neighborhood_prompts``; neighborhood prompts keep ``target_true``.

The hub default is ``azhx/counterfact`` (the original layout, train split of 19,728 rewrites).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from molf.data.io import MalformedRecordError, Row, optional, require

HUB_ID = "azhx/counterfact"
HUB_TRAIN_SPLIT = "train"
# Knowledge injection: the rewrites that were trained on are the ones scored.
HUB_EVAL_SPLIT = "train"


@dataclass(frozen=True)
class FactExample:
    prompt: str
    target: str  # " " + target_new
    subject: str
    target_new: str
    target_true: str
    rephrase_prompts: tuple[str, ...]
    locality_prompts: tuple[str, ...]
    locality_ground_truth: Optional[str]

    @property
    def question(self) -> str:
        return self.prompt


def _text(row: Row, value, field: str) -> str:
    if isinstance(value, dict):
        value = value.get("str")
    if not isinstance(value, str) or not value.strip():
        raise MalformedRecordError(f"{row.where}: field {field!r} must be a non-empty string (or {{'str': ...}})")
    return value.strip()


def _prompt_list(row: Row, field: str) -> tuple[str, ...]:
    value = optional(row, field)  # missing, null, blank or NaN: no prompts
    if value is None:
        return ()
    # Parquet readers give list cells as numpy arrays: any non-string sequence of strings will do.
    values = [value] if isinstance(value, str) else list(value) if _is_sequence(value) else None
    if values is None or not all(isinstance(item, str) for item in values):
        raise MalformedRecordError(f"{row.where}: field {field!r} must be a string or a list of strings")
    return tuple(item.strip() for item in values if item.strip())


def _is_sequence(value: Any) -> bool:
    """A list, tuple, numpy array or other sized iterable that is not a string or a mapping."""
    return hasattr(value, "__len__") and hasattr(value, "__iter__") and not isinstance(value, (str, bytes, dict))


def _example(prompt: str, subject: str, new: str, true: str, rephrase, locality, locality_truth) -> FactExample:
    return FactExample(prompt=prompt, target=f" {new}", subject=subject, target_new=new, target_true=true,
                       rephrase_prompts=rephrase, locality_prompts=locality, locality_ground_truth=locality_truth)


def parse_easyedit(row: Row) -> FactExample:
    locality = _prompt_list(row, "locality_prompt")
    truth = optional(row, "locality_ground_truth")
    if locality and truth is None:
        raise MalformedRecordError(f"{row.where}: field 'locality_ground_truth' is missing "
                                   "but 'locality_prompt' is set")
    return _example(_text(row, require(row, "prompt"), "prompt"), _text(row, require(row, "subject"), "subject"),
                    _text(row, require(row, "target_new"), "target_new"),
                    _text(row, require(row, "ground_truth"), "ground_truth"), _prompt_list(row, "rephrase_prompt"),
                    locality, _text(row, truth, "locality_ground_truth") if locality else None)


def parse_original(row: Row) -> FactExample:
    rewrite = require(row, "requested_rewrite")
    if not isinstance(rewrite, dict):
        raise MalformedRecordError(f"{row.where}: field 'requested_rewrite' must be an object")
    nested = Row(rewrite, f"{row.where} (requested_rewrite)")
    template = _text(nested, require(nested, "prompt"), "prompt")
    subject = _text(nested, require(nested, "subject"), "subject")
    if "{}" not in template:
        raise MalformedRecordError(f"{row.where}: field 'requested_rewrite.prompt' has no '{{}}' for the subject")
    true = _text(nested, require(nested, "target_true"), "target_true")
    return _example(template.replace("{}", subject), subject,
                    _text(nested, require(nested, "target_new"), "target_new"),
                    true, _prompt_list(row, "paraphrase_prompts"), _prompt_list(row, "neighborhood_prompts"), true)


def parse_rows(rows: list[Row]) -> list[FactExample]:
    return [parse_original(row) if "requested_rewrite" in row.fields else parse_easyedit(row) for row in rows]
