"""Reading benchmark rows from local files (JSONL, JSON, parquet, CSV) or the Hugging Face hub.

Every row keeps where it came from (``file:line`` or ``hub_id[split] row i``) so that a malformed
record can be reported precisely instead of becoming a silent wrong label.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
# Directory lookup: the file stems that count as each split, most specific first.
SPLIT_STEMS = {
    "train": ("train",),
    "eval": ("validation", "valid", "dev", "test", "eval"),
}


@dataclass(frozen=True)
class Row:
    """One raw record and its location, for error messages."""

    fields: dict[str, Any]
    where: str


class MalformedRecordError(ValueError):
    """A record lacks a field or holds an impossible value; the message names file, line and field."""


def require(row: Row, field: str) -> Any:
    """Return ``row.fields[field]``, or raise naming the file, line and missing field."""
    if field not in row.fields:
        raise MalformedRecordError(f"{row.where}: field {field!r} is missing; the row has fields {sorted(row.fields)} "
                                   "(data of another task? check --dataset_type, or --task when evaluating)")
    value = row.fields[field]
    if _is_empty(value):
        raise MalformedRecordError(f"{row.where}: field {field!r} is empty")
    return value


def optional(row: Row, field: str) -> Any:
    """``row.fields[field]``, or None when it is missing or empty (None, blank, NaN), for optional fields."""
    value = row.fields.get(field)
    return None if _is_empty(value) else value


def _is_empty(value: Any) -> bool:
    """None, a blank string, or a float NaN (a null cell as pandas reads it, ``NaN`` in JSON)."""
    return (value is None or (isinstance(value, str) and not value.strip())
            or (isinstance(value, float) and math.isnan(value)))


def load_rows(path: Optional[str], split: str, hub_id: str, hub_split: str) -> list[Row]:
    """Load the rows of ``split`` ("train" or "eval") from ``path`` or, when it is None, the hub.

    Args:
        path: local file or directory; a directory must hold one file per split named like
            ``train.jsonl`` / ``validation.jsonl`` (``dev``, ``test`` also count as eval).
        split: "train" or "eval", used to pick the file inside a directory.
        hub_id: Hugging Face dataset id loaded with ``datasets.load_dataset`` when ``path`` is None.
        hub_split: the hub split to load.

    Raises:
        FileNotFoundError: ``path`` does not exist or a directory holds no file for the split.
        MalformedRecordError: the file (or hub split) holds no rows, or a record is not valid.
    """
    if path is None:
        rows, source = _load_hub(hub_id, hub_split), f"{hub_id}[{hub_split}]"
    else:
        file = resolve_split_file(Path(path), split)
        rows, source = load_file(file), str(file)
    if not rows:
        raise MalformedRecordError(f"{source} holds no rows; pass a data file with at least one record")
    return rows


def resolve_split_file(path: Path, split: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist; pass an existing file or directory")
    if path.is_file():
        return path
    for stem in SPLIT_STEMS[split]:
        for suffix in SUPPORTED_SUFFIXES:
            candidate = path / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    names = ", ".join(f"{s}{x}" for s in SPLIT_STEMS[split] for x in SUPPORTED_SUFFIXES[:1])
    raise FileNotFoundError(f"no {split} file in directory {path}; expected one of {names} (or .json/.parquet/.csv)")


def load_file(path: Path) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _load_jsonl(path)
    if suffix == ".json":
        return _load_json(path)
    if suffix == ".parquet":
        return _load_parquet(path)
    if suffix == ".csv":
        return _load_csv(path)
    raise ValueError(f"unsupported data file {path}; use one of {', '.join(SUPPORTED_SUFFIXES)}")


def _load_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8-sig") as handle:  # -sig: a leading byte-order mark is skipped
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise MalformedRecordError(f"{path}:{line_number}: not valid JSON ({error.msg})") from error
            if not isinstance(record, dict):
                raise MalformedRecordError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            rows.append(Row(record, f"{path}:{line_number}"))
    return rows


def _load_json(path: Path) -> list[Row]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        # Many ".json" files in the wild are JSON lines: one object, then "extra data" on the next line.
        if text.lstrip().startswith("{") and error.msg == "Extra data":
            return _load_jsonl(path)
        raise MalformedRecordError(f"{path}:{error.lineno}: not valid JSON ({error.msg}, column {error.colno})") \
            from error
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise MalformedRecordError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    rows = []
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise MalformedRecordError(f"{path} record {index}: expected a JSON object, got {type(record).__name__}")
        rows.append(Row(record, f"{path} record {index}"))
    return rows


def _load_parquet(path: Path) -> list[Row]:
    import pandas as pd

    frame = pd.read_parquet(path)
    records = frame.astype(object).where(frame.notna(), None).to_dict("records")  # null cells: None, not NaN
    return [Row(record, f"{path} row {index}") for index, record in enumerate(records)]


def _load_csv(path: Path) -> list[Row]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        # Line 1 is the header, so data row i sits on line i + 2 (for rows without embedded newlines).
        return [Row(dict(record), f"{path}:{index + 2}") for index, record in enumerate(csv.DictReader(handle))]


def _load_hub(hub_id: str, hub_split: str) -> list[Row]:
    from datasets import load_dataset

    dataset = load_dataset(hub_id, split=hub_split)
    return [Row(dict(record), f"{hub_id}[{hub_split}] row {index}") for index, record in enumerate(dataset)]


def seeded_subset(num_rows: int, num_samples: Optional[int], seed: int) -> list[int]:
    """Indices of a seeded subsample of ``num_samples`` rows (all rows, in order, when None or too many)."""
    if num_samples is None or num_samples >= num_rows:
        return list(range(num_rows))
    return sorted(random.Random(seed).sample(range(num_rows), num_samples))
