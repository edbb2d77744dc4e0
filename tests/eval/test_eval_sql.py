"""SQL extraction, execution, matching and the known-answer case (gold as prediction)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from molf.data import load_examples
from molf.data.sql import SQLExample
from molf.eval.sql import (QueryResult, check_databases, extract_sql, gold_is_ordered, results_match, run_query,
                           score_prediction, score_sql)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sql"


def _examples(name):
    return load_examples(SimpleNamespace(dataset_type="sql", data_path=None, eval_data_path=str(FIXTURES / name)),
                         "eval")


def _memory_example(context: str, gold: str = "SELECT 1") -> SQLExample:
    return SQLExample(prompt="", target=gold, question="q", context=context, db_path=None)


@pytest.mark.parametrize("generated, expected", [
    ("SELECT name FROM t WHERE id IN (SELECT id FROM u WHERE x > 1); trailing words",
     "SELECT name FROM t WHERE id IN (SELECT id FROM u WHERE x > 1)"),
    ("WITH c AS (SELECT a FROM t) SELECT a FROM c;", "WITH c AS (SELECT a FROM t) SELECT a FROM c"),
    ("SELECT a FROM t UNION SELECT a FROM u", "SELECT a FROM t UNION SELECT a FROM u"),
    ("INSERT INTO t (a) SELECT a FROM u WHERE a > 0; SELECT 2;", "INSERT INTO t (a) SELECT a FROM u WHERE a > 0"),
    ("Here it is:\n```sql\nSELECT ';' AS s FROM t;\n```\nDone.", "SELECT ';' AS s FROM t"),
    ("SELECT \"a;b\" FROM t WHERE c = 'x;y'", "SELECT \"a;b\" FROM t WHERE c = 'x;y'"),
    ("SELECT a FROM t\n### Instruction:\nmore", "SELECT a FROM t"),
    ("no query here", "no query here"),
    ("(SELECT a FROM t) UNION (SELECT b FROM u);", "(SELECT a FROM t) UNION (SELECT b FROM u)"),
    ("SELECT a FROM t -- the ; is a comment\nWHERE a > 1; SELECT 2",
     "SELECT a FROM t -- the ; is a comment\nWHERE a > 1"),
    ("SELECT /* ; */ a FROM t; SELECT 2", "SELECT /* ; */ a FROM t"),
    ("SELECT * FROM t;\n```", "SELECT * FROM t"),
    ("SELECT * FROM t\n```\n\nExplanation of the query", "SELECT * FROM t"),
    # keywords inside comments or prose do not start the query
    ("-- Select the names\nSELECT name FROM t;", "SELECT name FROM t"),
    ("/* Query with a filter */ SELECT a FROM t WHERE a > 1", "SELECT a FROM t WHERE a > 1"),
    ("Here is the query with a join: SELECT a FROM t", "SELECT a FROM t"),
    ("select name\nfrom t\nwhere a > 1", "select name\nfrom t\nwhere a > 1"),
    # an inline fence whose first word is the query, not a language tag
    ("Sure! ```SELECT a FROM t```", "SELECT a FROM t"),
    # prose after a query without ';'
    ("SELECT name FROM t\nWHERE a > 1\nThis query selects the names.", "SELECT name FROM t\nWHERE a > 1"),
    ("SELECT count(*) FROM t\n\nNote: this counts every row.", "SELECT count(*) FROM t"),
    # a second query run on without a ';' (Spider-trained models end queries with a line break)
    ("SELECT count(*) FROM singer\n\nSELECT name FROM singer", "SELECT count(*) FROM singer"),
    ("SELECT count(*) FROM singer\nSELECT count(*) FROM singer", "SELECT count(*) FROM singer"),
    ("WITH c AS (\n  SELECT 1\n)\nSELECT * FROM c\nSELECT 2", "WITH c AS (\n  SELECT 1\n)\nSELECT * FROM c"),
    ("SELECT a FROM t WHERE a IN\n(SELECT b FROM u)\nSELECT 9", "SELECT a FROM t WHERE a IN\n(SELECT b FROM u)"),
    # ... but a line that continues the statement is kept
    ("SELECT a FROM t\nUNION\nSELECT b FROM u", "SELECT a FROM t\nUNION\nSELECT b FROM u"),
    ("INSERT INTO t (a)\nSELECT a FROM u", "INSERT INTO t (a)\nSELECT a FROM u"),
    # a keyword in the sentence that introduces the query, a fence closed on the query's line
    ("Here is the SELECT statement:\n```sql\nSELECT a FROM t\n```", "SELECT a FROM t"),
    ("To answer this, use a SELECT with COUNT:\nSELECT COUNT(*) FROM t;", "SELECT COUNT(*) FROM t"),
    ("SELECT a FROM t```\nThis is it.", "SELECT a FROM t"),
])
def test_extract_first_complete_statement(generated, expected):
    assert extract_sql(generated) == expected


def test_gold_as_prediction_scores_100_on_spider_fixture():
    examples = _examples("spider_dev.jsonl")
    metrics = score_sql(examples, [example.target for example in examples], timeout_s=10.0)
    assert metrics == {"execution_accuracy": 100.0, "exact_match": 100.0, "logic_match": 100.0,
                       "valid_sql_rate": 100.0, "gold_errors": 0}


def test_gold_as_prediction_on_gretel_rows_with_inserts():
    examples = _examples("gretel_test.jsonl")
    metrics = score_sql(examples, [example.target for example in examples], timeout_s=10.0)
    assert metrics["execution_accuracy"] == 100.0 and metrics["exact_match"] == 100.0
    assert metrics["gold_errors"] < len(examples)


def test_wrong_query_is_not_an_execution_match_but_equivalent_one_is():
    [example] = _examples("spider_dev.jsonl")[:1]  # SELECT count(*) FROM singer
    metrics = score_sql([example] * 3, ["SELECT count(*) + 1 FROM singer", "select COUNT(*)   from singer",
                                        "SELECT count(Singer_ID) FROM singer"], timeout_s=10.0)
    assert metrics["execution_accuracy"] == pytest.approx(200 / 3)
    assert metrics["exact_match"] == pytest.approx(100 / 3)
    assert metrics["logic_match"] == pytest.approx(100 / 3)
    assert metrics["valid_sql_rate"] == 100.0


def test_order_matters_only_with_gold_order_by():
    assert gold_is_ordered("SELECT a FROM t ORDER BY a")
    assert not gold_is_ordered("SELECT a FROM t WHERE a IN (SELECT a FROM u ORDER BY a LIMIT 2)")
    assert results_match(QueryResult([(1,), (2,), (2,)]), QueryResult([(2,), (1,), (2,)]), ordered=False)
    assert not results_match(QueryResult([(1,), (2,)]), QueryResult([(1,), (2,), (2,)]), ordered=False)
    assert not results_match(QueryResult([(1,), (2,)]), QueryResult([(2,), (1,)]), ordered=True)


def test_each_query_gets_a_fresh_database():
    example = _memory_example("CREATE TABLE t (a INT); INSERT INTO t VALUES (1);")
    assert run_query(example, "DELETE FROM t", 5.0) == (QueryResult([("t", "<columns>", "a")], changes_data=True), None)
    assert run_query(example, "SELECT a FROM t", 5.0) == (QueryResult([(1,)], columns=1), None)


def test_data_changing_gold_is_judged_by_the_data_it_leaves():
    context = "CREATE TABLE t (id INT, d TEXT); INSERT INTO t VALUES (1, 'a'), (2, 'b');"
    example = _memory_example(context, gold="UPDATE t SET d = 'z' WHERE id = 2")
    same_effect = ["UPDATE t SET d = 'z' WHERE id > 1", "update t set d='z' where d = 'b'"]
    other_effect = ["DELETE FROM t", "UPDATE t SET d = 'z'", "SELECT 1 WHERE 0", "SELECT * FROM t"]
    assert all(score_prediction(example, query, 5.0).executed_match for query in same_effect)
    assert not any(score_prediction(example, query, 5.0).executed_match for query in other_effect)


def test_spider_database_is_read_only():
    [example] = _examples("spider_dev.jsonl")[:1]
    result, error = run_query(example, "DELETE FROM singer", 5.0)
    assert result is None and "readonly" in error.replace(" ", "").lower()
    assert run_query(example, "SELECT count(*) FROM singer", 5.0)[0] == QueryResult([(6,)], columns=1)


def test_runaway_query_hits_the_time_limit():
    runaway = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n"
    result, error = run_query(_memory_example(""), runaway, timeout_s=0.2)
    assert result is None and "timed out" in error


def test_missing_spider_database_is_a_clear_error(tmp_path):
    [example] = _examples("spider_dev.jsonl")[:1]
    moved = SQLExample(example.prompt, example.target, example.question, example.context, tmp_path / "x.sqlite")
    with pytest.raises(FileNotFoundError, match="--spider_databases_dir"):
        run_query(moved, "SELECT 1", 1.0)


def test_missing_spider_databases_are_named_before_any_generation(tmp_path):
    examples = _examples("spider_dev.jsonl")[:3]
    check_databases(examples)
    moved = [SQLExample(e.prompt, e.target, e.question, e.context, tmp_path / "gone" / "gone.sqlite")
             for e in examples[:2]]
    with pytest.raises(FileNotFoundError, match=r"2 eval rows .*gone.sqlite \(2 rows\).*--spider_databases_dir"):
        check_databases(examples + moved)


def test_a_prediction_of_comments_only_is_no_valid_query():
    example = _memory_example("CREATE TABLE t (a INT);", gold="DELETE FROM t WHERE a = 5")
    score = score_prediction(example, extract_sql("-- I am not sure"), timeout_s=5.0)
    assert not score.valid and score.executed_match is False and score.error == "empty prediction"


def test_empty_results_of_different_widths_do_not_match():
    example = _memory_example("CREATE TABLE t (a INT, b INT);", gold="SELECT a, b FROM t")
    assert score_prediction(example, "SELECT a, b FROM t WHERE a > 0", 5.0).executed_match
    assert not score_prediction(example, "SELECT 1 WHERE 0", 5.0).executed_match


def test_logic_match_ignores_comments():
    example = _memory_example("CREATE TABLE t (a INT);", gold="SELECT a FROM t")
    assert score_prediction(example, "SELECT a FROM t -- all of them", 5.0).logic


def test_a_huge_value_is_refused_instead_of_overrunning_the_time_limit():
    import time

    example = _memory_example("CREATE TABLE t (a INT);")
    start = time.monotonic()
    result, error = run_query(example, "SELECT hex(zeroblob(300000000))", timeout_s=1.0)
    assert result is None and "too big" in error
    assert time.monotonic() - start < 1.0


def test_a_generated_attach_creates_no_file(tmp_path):
    target = tmp_path / "made_by_the_model.db"
    result, error = run_query(_memory_example("CREATE TABLE t (a INT);"), f"ATTACH DATABASE '{target}' AS x", 5.0)
    assert result is None and "not authorized" in error
    assert not target.exists()


def test_a_table_declared_twice_is_built_once_with_all_its_columns():
    # sql-create-context declares a self-join's table once per alias (about 3% of its rows), and a few
    # of its rows give one column twice in different case.
    gold = "SELECT T1.name FROM station AS T1 JOIN station AS T2 ON T1.id = T2.city"
    example = _memory_example("CREATE TABLE station (id VARCHAR, name VARCHAR); "
                              "CREATE TABLE station (id VARCHAR, city VARCHAR)", gold)
    score = score_prediction(example, gold, timeout_s=5.0)
    assert score.valid and score.executed_match and score.error is None
    example = _memory_example("CREATE TABLE album (AlbumID INTEGER, AlbumId INTEGER, title VARCHAR)",
                              "SELECT title FROM album WHERE albumid = 1")
    assert score_prediction(example, "SELECT title FROM album WHERE AlbumID = 1", timeout_s=5.0).executed_match
    # any other broken context is still an error, for gold and prediction alike
    broken = _memory_example("CREATE TABLE t (a INT); CREATE TABLE", "SELECT a FROM t")
    score = score_prediction(broken, "SELECT a FROM t", timeout_s=5.0)
    assert score.executed_match is None and not score.valid


def test_merged_schema_keeps_other_statements_and_quoted_text():
    from molf.eval.sql import merged_schema

    context = ('CREATE TABLE a (x INT, PRIMARY KEY (x)); INSERT INTO a VALUES (1); '
               'CREATE TABLE "b;c" (y TEXT); CREATE TABLE A (X INT, z TEXT, PRIMARY KEY (x))')
    assert merged_schema(context) == ('CREATE TABLE a (x INT, PRIMARY KEY (x), z TEXT);\n'
                                      'INSERT INTO a VALUES (1);\nCREATE TABLE "b;c" (y TEXT);')


def test_a_looping_generation_costs_a_bounded_number_of_parses(monkeypatch):
    import molf.eval.sql as sql_eval

    calls = []
    parse = sql_eval.sqlglot.parse
    monkeypatch.setattr(sql_eval.sqlglot, "parse", lambda text, **kw: calls.append(len(text)) or parse(text, **kw))
    generation = "SELECT count(*) FROM singer\n" * 1000  # greedy decoding stuck on one line
    assert extract_sql(generation) == "SELECT count(*) FROM singer"
    assert len(calls) <= sql_eval.MAX_RUN_ON_BREAKS + 1  # the whole text once, then the first breaks


def test_merged_schema_keys_columns_by_their_whole_quoted_name_and_ignores_comments():
    from molf.eval.sql import merged_schema

    assert merged_schema('CREATE TABLE t ("first name" TEXT, "first id" INT); CREATE TABLE t (x INT)') == \
        'CREATE TABLE t ("first name" TEXT, "first id" INT, x INT);'
    context = ("CREATE TABLE t (id INT, -- the key\n name TEXT, -- the name\n age INT -- years\n); "
               "CREATE TABLE t (city TEXT)")
    assert merged_schema(context) == "CREATE TABLE t (id INT, name TEXT, age INT, city TEXT);"
