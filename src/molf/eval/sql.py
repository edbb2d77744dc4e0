"""Text-to-SQL evaluation: execution accuracy, exact match, sqlglot logic match, valid-SQL rate.

Execution: every query (gold and predicted, separately) runs in a fresh database, either an
in-memory SQLite built from the row's context (CREATE TABLE and, for gretel rows, INSERT
statements) or the row's Spider ``.sqlite`` opened read-only, under a time limit enforced by the
SQLite progress handler, so a runaway query cannot hang the evaluation.

Result-set match: rows are compared as a multiset (order-insensitive, duplicates counted) unless
the gold query has a top-level ORDER BY, in which case the row order must match too. Rows whose
gold query fails to run are left out of execution accuracy and counted in ``gold_errors``.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import sqlglot
from sqlglot import exp

from molf.data.sql import SQLExample

logger = logging.getLogger(__name__)

_FENCE = re.compile(r"```[A-Za-z]*[ \t]*\n?(.*?)(?:```|$)", re.S)
_SQL_START = re.compile(r"\b(WITH|SELECT|INSERT|UPDATE|DELETE|REPLACE|CREATE|DROP|ALTER|PRAGMA|VALUES)\b", re.I)
_CLOSING_QUOTE = {"'": "'", '"': '"', "`": "`", "[": "]"}
# A runaway result (e.g. an accidental cross join) is cut here; it cannot match a sane gold result anyway.
MAX_RESULT_ROWS = 100_000


def _first_statement(text: str) -> str:
    """Text up to the first ';' outside quotes, or up to an Alpaca '###' section line, or the end."""
    closing: Optional[str] = None
    for index, char in enumerate(text):
        if closing is not None:
            if char == closing:
                closing = None
        elif char in _CLOSING_QUOTE:
            closing = _CLOSING_QUOTE[char]
        elif char == ";":
            return text[:index]
        elif char == "\n" and text.startswith("###", index + 1):
            return text[:index]
    return text


def extract_sql(generated: str) -> str:
    """The first complete SQL statement of a generation (inside the first fenced block if there is one).

    It starts at the first SQL keyword and ends at the first top-level ';' not inside a string, so
    subqueries, CTEs, UNION and INSERT ... SELECT stay whole.
    """
    fenced = _FENCE.search(generated)
    text = fenced.group(1) if fenced else generated
    start = _SQL_START.search(text)
    if start is None:
        return text.strip()
    return _first_statement(text[start.start():]).strip()


def _connect(example: SQLExample, deadline: float) -> sqlite3.Connection:
    if example.db_path is not None:
        if not example.db_path.is_file():
            raise FileNotFoundError(f"Spider database {example.db_path} not found; pass --spider_databases_dir")
        connection = sqlite3.connect(f"{example.db_path.resolve().as_uri()}?mode=ro", uri=True)
    else:
        connection = sqlite3.connect(":memory:")
    # Called every 1,000 SQLite VM instructions; a non-zero return aborts the running statement.
    connection.set_progress_handler(lambda: int(time.monotonic() > deadline), 1_000)
    if example.db_path is None and example.context:
        connection.executescript(example.context)
    return connection


def run_query(example: SQLExample, query: str, timeout_s: float) -> tuple[Optional[list[tuple]], Optional[str]]:
    """Rows of ``query`` in a fresh database for ``example``, or (None, error message)."""
    deadline = time.monotonic() + timeout_s
    connection = None
    try:
        connection = _connect(example, deadline)
        rows = connection.execute(query).fetchmany(MAX_RESULT_ROWS)
        return rows, None
    except FileNotFoundError:
        raise
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError) as error:
        timed_out = time.monotonic() > deadline
        return None, f"timed out after {timeout_s}s" if timed_out else f"{type(error).__name__}: {error}"
    finally:
        if connection is not None:
            connection.close()


def gold_is_ordered(gold: str) -> bool:
    """True when the gold query has a top-level ORDER BY (then row order is part of the answer)."""
    try:
        tree = sqlglot.parse_one(gold, read="sqlite")
    except sqlglot.errors.SqlglotError:
        return re.search(r"\border\s+by\b", gold, re.I) is not None
    return tree is not None and tree.args.get("order") is not None


def results_match(gold_rows: Sequence[tuple], predicted_rows: Sequence[tuple], ordered: bool) -> bool:
    if ordered:
        return list(gold_rows) == list(predicted_rows)
    return Counter(gold_rows) == Counter(predicted_rows)


def normalize_text(query: str) -> str:
    """Exact-match form: whitespace collapsed, trailing ';' dropped, case-folded."""
    return " ".join(query.strip().rstrip(";").split()).casefold()


def canonical_sql(query: str) -> Optional[str]:
    """sqlglot's normalized rendering (identifiers lower-cased, layout canonical), None if unparsable."""
    try:
        tree = sqlglot.parse_one(query.strip().rstrip(";"), read="sqlite")
    except sqlglot.errors.SqlglotError:
        return None
    if tree is None or isinstance(tree, exp.Command):
        return None
    return tree.sql(dialect="sqlite", normalize=True)


@dataclass
class SQLScore:
    executed_match: Optional[bool]  # None: the gold query itself failed
    exact: bool
    logic: bool
    valid: bool
    error: Optional[str]


def score_prediction(example: SQLExample, predicted: str, timeout_s: float) -> SQLScore:
    gold_rows, gold_error = run_query(example, example.target, timeout_s)
    predicted_rows, error = run_query(example, predicted, timeout_s) if predicted else (None, "empty prediction")
    matched = None
    if gold_error is None:
        matched = predicted_rows is not None and results_match(gold_rows, predicted_rows, gold_is_ordered(example.target))
    gold_canonical = canonical_sql(example.target)
    logic = gold_canonical is not None and canonical_sql(predicted) == gold_canonical
    return SQLScore(matched, normalize_text(predicted) == normalize_text(example.target), logic,
                    predicted_rows is not None, error)


def _percent(count: int, total: int) -> float:
    return 100.0 * count / total if total else float("nan")


def score_sql(examples: Sequence[SQLExample], predictions: Sequence[str], timeout_s: float) -> dict[str, Any]:
    """The four SQL metrics (in %) plus ``gold_errors`` over aligned examples and predictions."""
    scores = [score_prediction(example, predicted, timeout_s) for example, predicted in zip(examples, predictions, strict=True)]
    judged = [score.executed_match for score in scores if score.executed_match is not None]
    gold_errors = len(scores) - len(judged)
    if gold_errors:
        logger.warning("%d gold queries failed to run; those rows are left out of execution accuracy", gold_errors)
    return {
        "execution_accuracy": _percent(sum(judged), len(judged)),
        "exact_match": _percent(sum(score.exact for score in scores), len(scores)),
        "logic_match": _percent(sum(score.logic for score in scores), len(scores)),
        "valid_sql_rate": _percent(sum(score.valid for score in scores), len(scores)),
        "gold_errors": gold_errors,
    }
