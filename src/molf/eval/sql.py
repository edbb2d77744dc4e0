"""Text-to-SQL evaluation: execution accuracy, exact match, sqlglot logic match, valid-SQL rate.

Execution: every query (gold and predicted, separately) runs in a fresh database, either an
in-memory SQLite built from the row's context (CREATE TABLE and, for gretel rows, INSERT
statements) or the row's Spider ``.sqlite`` opened read-only, under a time limit enforced by the
SQLite progress handler, so a runaway query cannot hang the evaluation.

Result-set match: rows are compared as a multiset (order-insensitive, duplicates counted) unless
the gold query has a top-level ORDER BY, in which case the row order must match too. A statement
without a result set (gretel's UPDATE / INSERT / DELETE rows) is judged by what it leaves behind:
the contents of every table of its fresh database afterwards, compared as a multiset. Rows whose
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

_KEYWORDS = "WITH|SELECT|INSERT|UPDATE|DELETE|REPLACE|CREATE|DROP|ALTER|PRAGMA|VALUES"
# A fence's language tag is a word that is not itself the query's first keyword (```SELECT a FROM t```).
_FENCE = re.compile(rf"```(?:(?![ \t]*(?i:{_KEYWORDS})\b)[A-Za-z]*)?[ \t]*\n?(.*?)(?:```|$)", re.S)
_SQL_START = re.compile(rf"\b({_KEYWORDS})\b", re.I)
# A line that starts a statement of its own (VALUES only continues an INSERT).
_STATEMENT_LINE = re.compile(
    r"[ \t\r\n]*\(*[ \t]*(?:WITH|SELECT|INSERT|UPDATE|DELETE|REPLACE|CREATE|DROP|ALTER|PRAGMA)\b", re.I)
_COMMENT = re.compile(r"--[^\n]*|/\*.*?(?:\*/|$)", re.S)
# A line of prose after the query ("This query lists the names.", "Note: it counts rows."): a capitalised
# word (and a ':'), two more words, a closing '.', ':' or '!'. SQL lines do not look like that (keywords
# are upper or lower case).
_PROSE_LINE = re.compile(r"[A-Z][a-z]+:?(?:\s+\S+){2,}[.:!]")
# CREATE TABLE name (items), the name bare or quoted; not CREATE TABLE ... AS SELECT.
_CREATE_TABLE = re.compile(r"CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(\"[^\"]+\"|`[^`]+`|\[[^\]]+\]|[^\s(]+)\s*"
                           r"\((.*)\)", re.I | re.S)
_TABLE_CONSTRAINT = re.compile(r"(?:CONSTRAINT|PRIMARY|FOREIGN|UNIQUE|CHECK)\b", re.I)
_LEADING_NAME = re.compile(r"\"[^\"]+\"|`[^`]+`|\[[^\]]+\]|'[^']+'|[^\s(]+")  # a column's name, quoted or bare
_OPENING_PARENS = re.compile(r"(?:\(\s*)+$")  # "(" / "( (" right before the first keyword
_CLOSING_QUOTE = {"'": "'", '"': '"', "`": "`", "[": "]"}
# A runaway result (e.g. an accidental cross join) is cut here; it cannot match a sane gold result anyway.
MAX_RESULT_ROWS = 100_000
# Line breaks tried as the end of a query run on into the next one (see ``_first_of_run_on``).
MAX_RUN_ON_BREAKS = 16
# The largest string or blob a query may build (SQLite's default is 1 GB).
MAX_VALUE_BYTES = 2**24


def _code(text: str):
    """``(index, char)`` of every character of ``text`` outside quotes, quoted identifiers and comments
    (a code fence, three backticks, counts as code)."""
    closing: Optional[str] = None  # the character or string that ends the quote or comment we are in
    index = 0
    while index < len(text):
        char = text[index]
        if closing is not None:
            if text.startswith(closing, index):
                index += len(closing) - 1
                closing = None
        elif text.startswith("```", index):
            yield index, char
        elif char in _CLOSING_QUOTE:
            closing = _CLOSING_QUOTE[char]
        elif text.startswith("--", index):
            closing = "\n"
        elif text.startswith("/*", index):
            closing = "*/"
        else:
            yield index, char
        index += 1


def _first_statement(text: str) -> str:
    """Text up to the first ';' or code fence outside quotes and comments, or up to a line that starts an
    Alpaca '###' section, or the end; a second statement run on without a ';' is cut off
    (see ``_first_of_run_on``)."""
    depth = 0  # parentheses open outside quotes and comments
    breaks = []  # line breaks at depth 0 after which a line starts with a statement keyword
    for index, char in _code(text):
        if char == ";" or text.startswith("```", index):  # a fence closed right after the query, too
            return _first_of_run_on(text[:index], breaks)
        if char in "()":
            depth = max(depth + (1 if char == "(" else -1), 0)
        elif char == "\n":
            if text.startswith(("###", "```"), index + 1):
                return _first_of_run_on(text[:index], breaks)
            if depth == 0 and _STATEMENT_LINE.match(text, index + 1):
                breaks.append(index)
    return _first_of_run_on(text, breaks)


def _first_of_run_on(statement: str, breaks: list[int]) -> str:
    """``statement`` cut at the last of ``breaks`` before which it is one complete statement, when it
    is not one statement as a whole: a generation that runs on into a second query without a ';'
    ("SELECT a FROM t\n\nSELECT b FROM t"). Spider's gold queries have no ';', so models trained on them
    end their queries with a line break. A line that continues the statement (the SELECT after
    ``WITH c AS (...)`` or ``INSERT INTO t (a)``, after ``UNION``) is no break: the whole parses as one,
    or the text before the line is no complete statement. The last such break, not the first, because
    sqlglot accepts some unfinished text ("... WHERE a IN" before a line "(SELECT ...)"). Judged by
    sqlglot's SQLite parser; what it cannot parse is left whole."""
    if not breaks or _parses_as_one(statement):
        return statement
    # Only the first breaks: the first statement is near the start, and a generation looping on one
    # line would otherwise cost a parse of a growing prefix per line (quadratic in its length).
    for offset in reversed(breaks[:MAX_RUN_ON_BREAKS]):
        if _parses_as_one(statement[:offset]):
            return statement[:offset]
    return statement


def _parses_as_one(text: str) -> bool:
    quiet = logging.getLogger("sqlglot")
    disabled, quiet.disabled = quiet.disabled, True  # its "falling back to a Command" notes, per attempt
    try:
        trees = [tree for tree in sqlglot.parse(text, read="sqlite") if tree is not None]
    except sqlglot.errors.SqlglotError:
        return False
    finally:
        quiet.disabled = disabled
    return len(trees) == 1 and not isinstance(trees[0], exp.Command)


def extract_sql(generated: str) -> str:
    """The first complete SQL statement of a generation.

    The statement starts at the first SQL keyword (with any parentheses opened just before it, as in
    ``(SELECT ...) UNION (SELECT ...)``) and ends at the first ';' outside strings and comments, so
    subqueries, CTEs, UNION and INSERT ... SELECT stay whole. A fenced code block is read instead
    when it opens before the first keyword; a fence after the query just ends it.
    """
    fenced, keyword = _FENCE.search(generated), _sql_start(generated)
    use_fence = fenced is not None and (keyword is None or fenced.start() < keyword.start())
    text = fenced.group(1) if use_fence else generated
    start = _sql_start(text) if use_fence else keyword
    if start is None:
        return text.strip()
    opening = _OPENING_PARENS.search(text, 0, start.start())
    begin = opening.start() if opening else start.start()
    return _without_trailing_prose(_first_statement(text[begin:])).strip()


def _sql_start(text: str) -> Optional[re.Match]:
    """The keyword the query starts at: the first outside comments that is upper case or begins its
    line (so the "with" of "a query with a join: SELECT ..." is passed over) and is not on a line ending
    in ':' (so is the SELECT of "Here is the SELECT statement:"), else the first outside comments."""
    comments = [match.span() for match in _COMMENT.finditer(text)]
    candidates = [m for m in _SQL_START.finditer(text) if not any(a <= m.start() < b for a, b in comments)]
    for match in candidates:
        line_start = text.rfind("\n", 0, match.start()) + 1
        line_end = text.find("\n", match.start())
        if text[match.start():None if line_end < 0 else line_end].rstrip().endswith(":"):
            continue  # a line that introduces the query ("Here is the SELECT statement:")
        if match.group().isupper() or not text[line_start:match.start()].strip(" \t("):
            return match
    return candidates[0] if candidates else None


def _without_trailing_prose(statement: str) -> str:
    """The statement cut before its first line of prose (after the first line), for a generation that
    ends its query without a ';' and goes on explaining it."""
    lines = statement.split("\n")
    for index in range(1, len(lines)):
        if _PROSE_LINE.fullmatch(lines[index].strip()):
            return "\n".join(lines[:index])
    return statement


def has_code(query: str) -> bool:
    """Whether anything but comments, ';' and whitespace is left in ``query``."""
    return bool(_COMMENT.sub("", query).strip(" \t\r\n;"))


def _connect(example: SQLExample, deadline: float) -> sqlite3.Connection:
    connection = _open(example, deadline)
    if example.db_path is None and example.context:
        try:
            connection.executescript(example.context)
        except sqlite3.OperationalError as error:
            if not re.search(r"already exists|duplicate column", str(error)):
                connection.close()
                raise
            # sql-create-context declares a table once per alias of a self-join; build it once.
            connection.close()
            connection = _open(example, deadline)
            try:
                connection.executescript(merged_schema(example.context))
            except BaseException:
                connection.close()
                raise
    connection.set_authorizer(_no_attach)  # a generated ATTACH would create files on disk
    return connection


def _open(example: SQLExample, deadline: float) -> sqlite3.Connection:
    if example.db_path is not None:
        if not example.db_path.is_file():
            raise FileNotFoundError(f"Spider database {example.db_path} not found; pass --spider_databases_dir")
        connection = sqlite3.connect(f"{example.db_path.resolve().as_uri()}?mode=ro", uri=True)
    else:
        connection = sqlite3.connect(":memory:")
    # Called every 1,000 SQLite VM instructions; a non-zero return aborts the running statement.
    connection.set_progress_handler(lambda: int(time.monotonic() > deadline), 1_000)
    # One huge string or blob (zeroblob(3e8)) is a single instruction that the handler cannot stop.
    if hasattr(connection, "setlimit"):  # Python 3.11+
        connection.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
    return connection


def merged_schema(context: str) -> str:
    """``context`` with each table declared once: the first CREATE TABLE of a name (case-insensitive)
    takes the columns of its later declarations, which are dropped, and a column declared twice in
    different case (``AlbumID``, ``AlbumId``) is kept once. Other statements are kept as they are.

    sql-create-context gives a self-join's table once per alias, so about 3% of its rows cannot be
    built as they are.
    """
    statements = [statement.strip() for statement in _split_top_level(context, ";") if statement.strip()]
    merged: list[str] = []
    tables: dict[str, tuple[int, str, list[str], set[str]]] = {}  # name -> (position, spelling, items, keys)
    for statement in statements:
        match = _CREATE_TABLE.fullmatch(statement)
        if match is None:
            merged.append(statement)
            continue
        name = _unquote(match.group(1)).casefold()
        if name not in tables:
            tables[name] = (len(merged), match.group(1), [], set())
            merged.append("")
        _, _, items, keys = tables[name]
        for item in (_COMMENT.sub(" ", item).strip() for item in _split_top_level(match.group(2), ",")):
            name = _LEADING_NAME.match(item)
            key = (" ".join(item.split()).casefold() if _TABLE_CONSTRAINT.match(item) or name is None
                   else _unquote(name.group()).casefold())
            if item and key not in keys:
                keys.add(key)
                items.append(item)
    for position, spelling, items, _ in tables.values():
        merged[position] = f"CREATE TABLE {spelling} ({', '.join(items)})"
    return ";\n".join(merged) + ";"


def _split_top_level(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` outside quotes, comments and parentheses."""
    parts, start, depth = [], 0, 0
    for index, char in _code(text):
        if char in "()":
            depth = max(depth + (1 if char == "(" else -1), 0)
        elif char == separator and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    return parts + [text[start:]]


def _unquote(name: str) -> str:
    return name[1:-1] if len(name) > 1 and name[0] in _CLOSING_QUOTE and name[-1] == _CLOSING_QUOTE[name[0]] else name


def _no_attach(action: int, *args: object) -> int:
    return sqlite3.SQLITE_DENY if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH) else sqlite3.SQLITE_OK


@dataclass(frozen=True)
class QueryResult:
    """What a statement produced: its result rows, or (``changes_data``) the database's contents after
    a statement without a result set, one ``(table, *row)`` tuple per row and a ``(table,
    "<columns>", *names)`` tuple per table."""

    rows: list[tuple]
    changes_data: bool = False
    columns: int = 0  # of a result set: two empty results of different widths are different answers


def _database_contents(connection: sqlite3.Connection) -> list[tuple]:
    tables = [name for (name,) in connection.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    contents: list[tuple] = []
    for table in tables:
        quoted = '"' + table.replace('"', '""') + '"'
        cursor = connection.execute(f"SELECT * FROM {quoted}")
        contents.append((table, "<columns>", *(column[0] for column in cursor.description)))
        contents.extend((table, *row) for row in cursor.fetchmany(MAX_RESULT_ROWS))
    return contents


def run_query(example: SQLExample, query: str, timeout_s: float) -> tuple[Optional[QueryResult], Optional[str]]:
    """What ``query`` gives in a fresh database for ``example`` (see ``QueryResult``), or (None, error message)."""
    deadline = time.monotonic() + timeout_s
    connection = None
    try:
        connection = _connect(example, deadline)
        cursor = connection.execute(query)
        if cursor.description is None:  # UPDATE, INSERT, DELETE, CREATE, ...: judged by the data it leaves
            return QueryResult(_database_contents(connection), changes_data=True), None
        return QueryResult(cursor.fetchmany(MAX_RESULT_ROWS), columns=len(cursor.description)), None
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


def results_match(gold: QueryResult, predicted: QueryResult, ordered: bool) -> bool:
    """Same kind of result and the same rows: in order when ``ordered``, else as multisets."""
    if gold.changes_data != predicted.changes_data or gold.columns != predicted.columns:
        return False
    if ordered and not gold.changes_data:
        return list(gold.rows) == list(predicted.rows)
    return Counter(gold.rows) == Counter(predicted.rows)


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
    return tree.sql(dialect="sqlite", normalize=True, comments=False)


@dataclass
class SQLScore:
    executed_match: Optional[bool]  # None: the gold query itself failed
    exact: bool
    logic: bool
    valid: bool
    error: Optional[str]


def score_prediction(example: SQLExample, predicted: str, timeout_s: float) -> SQLScore:
    gold, gold_error = run_query(example, example.target, timeout_s)
    # A prediction of comments only would run as a no-op; it is no query.
    result, error = run_query(example, predicted, timeout_s) if has_code(predicted) else (None, "empty prediction")
    matched = None
    if gold_error is None:
        matched = result is not None and results_match(gold, result, gold_is_ordered(example.target))
    gold_canonical = canonical_sql(example.target)
    logic = gold_canonical is not None and canonical_sql(predicted) == gold_canonical
    exact = normalize_text(predicted) == normalize_text(example.target)
    return SQLScore(matched, exact, logic, result is not None, error)


def check_databases(examples: Sequence[SQLExample]) -> None:
    """Fail before any generation when a Spider row's database file is missing.

    Raises:
        FileNotFoundError: naming each missing database and how many rows use it.
    """
    missing = Counter(str(example.db_path) for example in examples
                      if example.db_path is not None and not example.db_path.is_file())
    if missing:
        listed = ", ".join(f"{path} ({count} rows)" for path, count in sorted(missing.items()))
        raise FileNotFoundError(f"{sum(missing.values())} eval rows use Spider databases that are not there: {listed}; "
                                "pass --spider_databases_dir (the folder holding <db_id>/<db_id>.sqlite) or leave "
                                "those rows out of the eval file")


def _percent(count: int, total: int) -> float:
    return 100.0 * count / total if total else float("nan")


def score_sql(examples: Sequence[SQLExample], predictions: Sequence[str], timeout_s: float) -> dict[str, Any]:
    """The four SQL metrics (in %) plus ``gold_errors`` over aligned examples and predictions."""
    scores = [score_prediction(example, predicted, timeout_s)
              for example, predicted in zip(examples, predictions, strict=True)]
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
