"""Text-to-SQL: the Alpaca-layout prompt of DESIGN section 4 over three row layouts.

- gretel (``gretelai/synthetic_text_to_sql``): ``sql_prompt, sql_context, sql``; the context holds
  CREATE TABLE and often INSERT statements, which also build the evaluation database.
- sql-create-context (``b-mc2/sql-create-context``): ``question, context, answer``.
- Spider: ``question, query, db_id``; the schema is rendered from ``spider_tables.jsonl`` and the
  queries run on ``<databases dir>/<db_id>/<db_id>.sqlite``.

The layout is read from the first row's field names; every row must then have that layout's fields.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from molf.data.io import MalformedRecordError, Row, optional, require

HUB_ID = "gretelai/synthetic_text_to_sql"
HUB_TRAIN_SPLIT = "train"
HUB_EVAL_SPLIT = "test"

PREAMBLE_WITH_CONTEXT = ("Below is an instruction that describes a task, paired with an input that provides further "
                         "context. Write a response that appropriately completes the request.")
PREAMBLE_WITHOUT_CONTEXT = ("Below is an instruction that describes a task. "
                            "Write a response that appropriately completes the request.")
INSTRUCTION = "Write a SQL query to answer the question."

LAYOUT_FIELDS = {
    "gretel": ("sql_prompt", "sql_context", "sql"),
    "create_context": ("question", "context", "answer"),
    "spider": ("question", "query", "db_id"),
}
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class SQLExample:
    prompt: str
    target: str  # the gold SQL
    question: str
    context: str  # the schema shown in the prompt; run as a script for non-Spider rows
    db_path: Optional[Path]  # Spider database, opened read-only; None: build from ``context``


@dataclass(frozen=True)
class SpiderPaths:
    tables: Path
    databases: Path


def build_prompt(question: str, context: str) -> str:
    has_context = bool(context.strip())
    parts = [PREAMBLE_WITH_CONTEXT if has_context else PREAMBLE_WITHOUT_CONTEXT,
             f"### Instruction:\n{INSTRUCTION}", f"### Input:\n{question}"]
    if has_context:
        parts.append(f"### Context:\n{context}")
    parts.append("### Response:\n")
    return "\n\n".join(parts)


def spider_paths(data_file: Optional[Path], tables_path: Optional[str], databases_dir: Optional[str]) -> SpiderPaths:
    """Spider schema file and database directory: the flags when given, else next to the data file."""
    base = data_file.parent if data_file is not None else Path(".")
    return SpiderPaths(tables=Path(tables_path) if tables_path else base / "spider_tables.jsonl",
                       databases=Path(databases_dir) if databases_dir else base / "spider_databases")


def _quote(name: str) -> str:
    return name if _IDENTIFIER.match(name) else '"' + name.replace('"', '""') + '"'


def render_spider_schema(table: dict) -> str:
    """``CREATE TABLE t (col type, ...)`` statements, joined by "; ", in the layout of sql-create-context."""
    columns: dict[int, list[str]] = {index: [] for index in range(len(table["table_names_original"]))}
    for (table_index, name), column_type in zip(table["column_names_original"], table["column_types"]):
        if table_index >= 0:
            columns[table_index].append(f"{_quote(name)} {column_type}")
    return "; ".join(f"CREATE TABLE {_quote(table_name)} ({', '.join(columns[index])})"
                     for index, table_name in enumerate(table["table_names_original"]))


def load_spider_schemas(tables_path: Path) -> dict[str, str]:
    if not tables_path.is_file():
        raise FileNotFoundError(f"Spider rows need the schema file {tables_path}; pass --spider_tables_path")
    text = tables_path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        tables = [(f"record {index}", table) for index, table in enumerate(_parse_json(tables_path, text, 0))]
    else:
        tables = [(f"line {number}", _parse_json(tables_path, line, number))
                  for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    schemas = {}
    for where, table in tables:
        try:
            schemas[table["db_id"]] = render_spider_schema(table)
        except (KeyError, TypeError, IndexError) as error:
            raise MalformedRecordError(f"{tables_path} {where}: not a Spider table record ({type(error).__name__}: "
                                       f"{error}); expected the fields db_id, table_names_original, "
                                       "column_names_original, column_types") from error
    return schemas


def _parse_json(path: Path, text: str, line: int):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {line}" if line else f"line {error.lineno}"
        raise MalformedRecordError(f"{path} {where}: not valid JSON ({error.msg}, column {error.colno})") from error


def detect_layout(rows: list[Row]) -> str:
    if not rows:
        raise ValueError("the SQL data is empty")
    first = rows[0]
    for layout, fields in LAYOUT_FIELDS.items():
        if all(field in first.fields for field in fields):
            return layout
    known = "; ".join(f"{name}: {', '.join(fields)}" for name, fields in LAYOUT_FIELDS.items())
    raise MalformedRecordError(f"{first.where}: unknown SQL row layout with fields {sorted(first.fields)}; "
                               f"expected {known}")


def _example(question: str, sql: str, context: str, db_path: Optional[Path] = None) -> SQLExample:
    question, sql, context = question.strip(), sql.strip(), context.strip()
    return SQLExample(prompt=build_prompt(question, context), target=sql, question=question, context=context,
                      db_path=db_path)


def parse_rows(rows: list[Row], paths: SpiderPaths) -> list[SQLExample]:
    layout = detect_layout(rows)
    if layout == "gretel":
        return [_example(str(require(r, "sql_prompt")), str(require(r, "sql")), str(optional(r, "sql_context") or ""))
                for r in rows]
    if layout == "create_context":
        return [_example(str(require(r, "question")), str(require(r, "answer")), str(optional(r, "context") or ""))
                for r in rows]
    schemas = load_spider_schemas(paths.tables)
    examples = []
    for row in rows:
        db_id = str(require(row, "db_id"))
        if db_id not in schemas:
            raise MalformedRecordError(f"{row.where}: field 'db_id' = {db_id!r} is not in {paths.tables}")
        db_path = paths.databases / db_id / f"{db_id}.sqlite"
        examples.append(_example(str(require(row, "question")), str(require(row, "query")), schemas[db_id], db_path))
    return examples
