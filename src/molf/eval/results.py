"""The results CSVs: one per task, a fixed schema, appended under a file lock.

Many SLURM array jobs may append to the same file at once; the lock serialises them and each row
is flushed and fsync'ed before the lock is released, so rows are never lost or interleaved. A file
whose header differs from the task's schema is an error, never a silently mixed file.
"""

from __future__ import annotations

import csv
import io
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from filelock import FileLock

RUN_COLUMNS = (
    "timestamp_utc", "run_name", "mode", "model", "dataset", "learning_rate", "lora_learning_rate", "weight_decay",
    "lora_weight_decay", "lora_rank", "molf_lora_ranks", "molf_topk", "molf_score_fn", "lr_scheduler_type",
    "warm_up_ratio", "num_train_epochs", "max_steps", "per_device_batch_size", "gradient_accumulation_steps",
    "seed", "other_hparams", "checkpoint", "num_eval_samples", "num_eval",
)
TASK_METRICS = {
    "sql": ("execution_accuracy", "exact_match", "logic_match", "valid_sql_rate"),
    "med": ("accuracy", "invalid_answers"),
    "fact": ("efficacy_first_token", "efficacy_sequence", "margin_first_token", "margin_sequence",
             "generalization", "specificity"),
}
# Filled by the evaluator, not taken from the run: when it ran, the cap on evaluation examples it
# was given (empty: all) and how many it scored.
EVALUATOR_COLUMNS = ("timestamp_utc", "num_eval_samples", "num_eval")


def task_columns(task: str) -> tuple[str, ...]:
    if task not in TASK_METRICS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASK_METRICS)}")
    return RUN_COLUMNS + TASK_METRICS[task]


def results_path(results_dir: str | os.PathLike, task: str) -> Path:
    return Path(results_dir) / f"{task}.csv"


def build_row(task: str, run_info: Mapping[str, Any], metrics: Mapping[str, Any], num_eval: int,
              num_eval_samples: int | None = None) -> dict[str, Any]:
    """One CSV row: the run columns from ``run_info``, the UTC time, the evaluation's cap
    ``num_eval_samples`` (None: all), ``num_eval`` and the task's metrics.

    Raises:
        ValueError: ``run_info`` lacks a run column or has an unknown key, or a metric is missing.
    """
    expected = set(RUN_COLUMNS) - set(EVALUATOR_COLUMNS)
    missing, unknown = sorted(expected - set(run_info)), sorted(set(run_info) - set(RUN_COLUMNS))
    if missing or unknown:
        raise ValueError(f"run_info must have exactly the run columns; missing {missing}, unknown {unknown}")
    absent = [name for name in TASK_METRICS[task] if name not in metrics]
    if absent:
        raise ValueError(f"metrics for {task!r} lack {absent}")
    row = {**run_info, "timestamp_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "num_eval_samples": num_eval_samples, "num_eval": num_eval}
    row.update({name: metrics[name] for name in TASK_METRICS[task]})
    return row


def _csv_line(values: list[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(["" if value is None else value for value in values])
    return buffer.getvalue()


def _read_header(path: Path) -> list[str] | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    with path.open(encoding="utf-8", newline="") as handle:
        return next(csv.reader(handle), None)


def read_lines(path: str | os.PathLike) -> tuple[list[str], list[tuple[int, str]], list[int]]:
    """A results CSV line by line: ``(header, rows, torn)``, ``rows`` the ``(line number, line)`` of
    every row with as many fields as the header, ``torn`` the line numbers of the others.

    The appender writes one row per line and starts a new line after a row cut short by a killed
    writer, so each line is parsed on its own: a row cut inside a quoted field cannot swallow the rows
    after it, as it would for a reader that lets quotes span lines. An empty file gives ``([], [], [])``.
    """
    with Path(path).open(encoding="utf-8", newline="") as handle:
        lines = handle.read().splitlines()
    if not lines:
        return [], [], []
    header = next(csv.reader([lines[0]]))
    rows, torn = [], []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        if len(next(csv.reader([line]))) == len(header):
            rows.append((number, line))
        else:
            torn.append(number)
    return header, rows, torn


def _check_header(path: Path, header: list[str] | None, columns: tuple[str, ...]) -> None:
    if header is not None and header != list(columns):
        raise ValueError(f"{path} has columns {header}, not this task's schema {list(columns)}; "
                         "write to another --results_dir or move the old file away")


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def check_task_file(results_dir: str | os.PathLike, task: str) -> Path:
    """Check, before an evaluation runs, that its row can be appended to the task's CSV.

    Raises:
        ValueError: the CSV exists with another header (the evaluation's result could not be kept).
    """
    path = results_path(results_dir, task)
    _check_header(path, _read_header(path), task_columns(task))
    return path


def append_row(path: str | os.PathLike, row: Mapping[str, Any], columns: tuple[str, ...]) -> None:
    """Append ``row`` (keys exactly ``columns``) to the CSV at ``path``, writing the header first if new.

    Raises:
        ValueError: the row's keys differ from ``columns``, or the file has another header.
    """
    if set(row) != set(columns):
        raise ValueError(f"row keys differ from the schema: missing {sorted(set(columns) - set(row))}, "
                         f"extra {sorted(set(row) - set(columns))}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        header = _read_header(path)
        _check_header(path, header, columns)
        text = ("" if header is not None else _csv_line(list(columns))) + _csv_line([row[name] for name in columns])
        if header is not None and not _ends_with_newline(path):
            text = "\n" + text  # a row cut short by a killed writer stays on its own line
        with path.open("a", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


def append_task_row(results_dir: str | os.PathLike, task: str, row: Mapping[str, Any]) -> Path:
    path = results_path(results_dir, task)
    append_row(path, row, task_columns(task))
    return path
