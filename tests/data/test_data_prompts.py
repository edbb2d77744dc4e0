"""Each task's prompt template pinned on a real record of the fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from molf.data import fact, med, sql
from molf.data.io import MalformedRecordError, Row, load_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_med_prompt_on_real_record():
    [first] = med.parse_rows(load_file(FIXTURES / "med" / "train.jsonl")[:1], index_base=0)
    assert first.prompt == (
        "Answer the medical question below by choosing the correct option letter.\n"
        "Question: Which is not true about thoracic outlet syndrome?\n"
        "Options:\n"
        "A) Radial nerve is commonly affected\n"
        "B) Neurological features are most common\n"
        "C) Resection of 1st rib relieves symptom\n"
        "D) Positive Adson's test\n"
        "Answer:")
    assert first.target == " A" and first.answer == "A"


def test_med_original_layout_is_one_based():
    row = Row({"question": "Q?", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": 4}, "orig.json:7")
    assert med.parse_rows([row], index_base=1)[0].answer == "D"
    with pytest.raises(MalformedRecordError, match=r"orig.json:7.*'cop'.*--med_answer_index_base 1"):
        med.parse_rows([row], index_base=0)


def test_med_zero_cop_under_one_based_flag_is_an_error():
    row = Row({"question": "Q?", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": 0}, "f.jsonl:3")
    with pytest.raises(MalformedRecordError, match=r"f.jsonl:3.*--med_answer_index_base 0"):
        med.parse_rows([row], index_base=1)


@pytest.mark.parametrize("cop, letter", [(2, "C"), ("2", "C"), (2.0, "C"), ("2.0", "C"), (" 3 ", "D")])
def test_med_answer_index_accepts_whole_numbers(cop, letter):
    row = Row({"question": "Q?", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": cop}, "f.jsonl:1")
    assert med.parse_rows([row], index_base=0)[0].answer == letter


@pytest.mark.parametrize("cop", [2.7, True, "C", "2.5"])
def test_med_answer_index_that_is_not_a_whole_number_is_an_error(cop):
    row = Row({"question": "Q?", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": cop}, "f.jsonl:4")
    with pytest.raises(MalformedRecordError, match=r"f.jsonl:4: field 'cop' must be an integer"):
        med.parse_rows([row], index_base=0)


def test_med_missing_option_names_file_line_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "Q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1}\n'
                    '{"question": "Q", "opa": "a", "opb": "b", "opc": "c", "cop": 1}\n')
    with pytest.raises(MalformedRecordError, match=r"bad.jsonl:2: field 'opd'"):
        med.parse_rows(load_file(path), index_base=0)


def test_data_of_another_task_lists_the_fields_and_points_at_dataset_type():
    [row] = load_file(FIXTURES / "sql" / "sql_create_context.jsonl")[:1]
    expected = (r"field 'opa' is missing; the row has fields \[.*'question'.*\] "
                r"\(data of another task\? check --dataset_type, or --task when evaluating\)")
    with pytest.raises(MalformedRecordError, match=expected):
        med.parse_rows([row], index_base=0)


def test_an_empty_field_is_named_as_empty():
    row = Row({"question": "Q", "opa": " ", "opb": "b", "opc": "c", "opd": "d", "cop": 1}, "f.jsonl:3")
    with pytest.raises(MalformedRecordError, match=r"f.jsonl:3: field 'opa' is empty$"):
        med.parse_rows([row], index_base=0)


def test_sql_gretel_prompt_on_real_record():
    [first] = sql.parse_rows(load_file(FIXTURES / "sql" / "gretel_train.jsonl")[:1], sql.spider_paths(None, None, None))
    assert first.prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nWrite a SQL query to answer the question.\n\n"
        "### Input:\nWhat is the total volume of timber sold by each salesperson, sorted by salesperson?\n\n"
        "### Context:\nCREATE TABLE salesperson (salesperson_id INT, name TEXT, region TEXT); "
        "INSERT INTO salesperson (salesperson_id, name, region) VALUES (1, 'John Doe', 'North'), "
        "(2, 'Jane Smith', 'South'); CREATE TABLE timber_sales (sales_id INT, salesperson_id INT, volume REAL, "
        "sale_date DATE); INSERT INTO timber_sales (sales_id, salesperson_id, volume, sale_date) VALUES "
        "(1, 1, 120, '2021-01-01'), (2, 1, 150, '2021-02-01'), (3, 2, 180, '2021-01-01');\n\n"
        "### Response:\n")
    assert first.target.startswith("SELECT salesperson_id, name, SUM(volume)")


def test_sql_create_context_prompt_on_real_record():
    [first] = sql.parse_rows(load_file(FIXTURES / "sql" / "sql_create_context.jsonl")[:1],
                             sql.spider_paths(None, None, None))
    assert first.prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nWrite a SQL query to answer the question.\n\n"
        "### Input:\nHow many heads of the departments are older than 56 ?\n\n"
        "### Context:\nCREATE TABLE head (age INTEGER)\n\n"
        "### Response:\n")
    assert first.target == "SELECT COUNT(*) FROM head WHERE age > 56"


def test_sql_spider_prompt_renders_schema_and_database_path():
    data_file = FIXTURES / "sql" / "spider_dev.jsonl"
    [first] = sql.parse_rows(load_file(data_file)[:1], sql.spider_paths(data_file, None, None))
    assert first.prompt.endswith(
        "### Input:\nHow many singers do we have?\n\n### Context:\nCREATE TABLE stadium (Stadium_ID number, "
        "Location text, Name text, Capacity number, Highest number, Lowest number, Average number); CREATE TABLE "
        "singer (Singer_ID number, Name text, Country text, Song_Name text, Song_release_year text, Age number, "
        "Is_male others); CREATE TABLE concert (concert_ID number, concert_Name text, Theme text, Stadium_ID text, "
        "Year text); CREATE TABLE singer_in_concert (concert_ID number, Singer_ID text)\n\n### Response:\n")
    assert first.db_path == FIXTURES / "sql" / "spider_databases" / "concert_singer" / "concert_singer.sqlite"


def test_sql_prompt_without_context_drops_block_and_shortens_preamble():
    row = Row({"question": "How many rows?", "context": "", "answer": "SELECT 1"}, "x:1")
    [example] = sql.parse_rows([row], sql.spider_paths(None, None, None))
    assert example.prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nWrite a SQL query to answer the question.\n\n"
        "### Input:\nHow many rows?\n\n### Response:\n")


def test_sql_unknown_layout_and_unknown_db_are_errors(tmp_path):
    with pytest.raises(MalformedRecordError, match="unknown SQL row layout"):
        sql.parse_rows([Row({"q": "x"}, "y:1")], sql.spider_paths(None, None, None))
    data_file = FIXTURES / "sql" / "spider_dev.jsonl"
    row = Row({"question": "q", "query": "SELECT 1", "db_id": "nope"}, "z:4")
    with pytest.raises(MalformedRecordError, match=r"z:4: field 'db_id' = 'nope'"):
        sql.parse_rows([row], sql.spider_paths(data_file, None, None))


def test_fact_easyedit_record():
    [first] = fact.parse_rows(load_file(FIXTURES / "fact" / "counterfact.jsonl")[:1])
    assert first.prompt == "The mother tongue of Danielle Darrieux is"
    assert first.target == " English"
    assert (first.target_new, first.target_true) == ("English", "French")
    assert first.rephrase_prompts == ("Where Danielle Darrieux is from, people speak the language of",)
    assert first.locality_prompts == ("Michel Rocard is a native speaker of",)
    assert first.locality_ground_truth == "French"


def test_fact_original_layout():
    record = {"case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is",
                                                  "subject": "Danielle Darrieux",
                                                  "target_new": {"str": "English", "id": "Q1860"},
                                                  "target_true": {"str": "French", "id": "Q150"}},
              "paraphrase_prompts": ["p1 Danielle Darrieux speaks", "p2"], "neighborhood_prompts": ["n1", "n2", "n3"]}
    [example] = fact.parse_rows([Row(record, "cf.json record 0")])
    assert example.prompt == "The mother tongue of Danielle Darrieux is"
    assert (example.target, example.target_true) == (" English", "French")
    assert example.rephrase_prompts == ("p1 Danielle Darrieux speaks", "p2")
    assert example.locality_prompts == ("n1", "n2", "n3") and example.locality_ground_truth == "French"


def test_fact_missing_target_names_field():
    with pytest.raises(MalformedRecordError, match=r"cf:2: field 'target_new'"):
        fact.parse_rows([Row({"prompt": "p", "subject": "s", "ground_truth": "g"}, "cf:2")])


def test_fact_prompt_list_of_wrong_type_names_file_and_field():
    record = {"prompt": "p", "subject": "s", "target_new": "n", "ground_truth": "g", "rephrase_prompt": 5}
    with pytest.raises(MalformedRecordError, match=r"cf:9: field 'rephrase_prompt' must be a string or a list"):
        fact.parse_rows([Row(record, "cf:9")])


def test_a_nan_optional_field_is_absent_not_the_text_nan(tmp_path):
    # json.loads reads NaN; an optional field holding it means "not there", as a null does.
    (tmp_path / "sql.jsonl").write_text('{"sql_prompt": "How many rows?", "sql_context": NaN, "sql": "SELECT 1"}\n')
    (tmp_path / "med.jsonl").write_text('{"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 0, '
                                        '"subject_name": NaN}\n')
    (tmp_path / "cf.jsonl").write_text('{"prompt": "p", "subject": "s", "target_new": "n", "ground_truth": "g", '
                                       '"rephrase_prompt": NaN, "locality_prompt": NaN, '
                                       '"locality_ground_truth": NaN}\n')
    [example] = sql.parse_rows(load_file(tmp_path / "sql.jsonl"), sql.spider_paths(None, None, None))
    assert example.context == "" and "### Context" not in example.prompt and "nan" not in example.prompt
    assert med.parse_rows(load_file(tmp_path / "med.jsonl"), index_base=0)[0].subject is None
    [fact_example] = fact.parse_rows(load_file(tmp_path / "cf.jsonl"))
    assert fact_example.rephrase_prompts == () and fact_example.locality_prompts == ()
    assert fact_example.locality_ground_truth is None


def test_a_broken_spider_schema_file_is_named(tmp_path):
    (tmp_path / "tables.json").write_text('[{"db_id": "a", "table_names_original": ["t"],}]')
    with pytest.raises(MalformedRecordError, match=r"tables.json line 1: not valid JSON \(.*column"):
        sql.load_spider_schemas(tmp_path / "tables.json")
    first = (FIXTURES / "sql" / "spider_tables.jsonl").read_text().splitlines()[0]
    (tmp_path / "tables.jsonl").write_text(first + '\n{"db_id": "b"}\n')
    with pytest.raises(MalformedRecordError, match=r"tables.jsonl line 2: not a Spider table record.*column_names"):
        sql.load_spider_schemas(tmp_path / "tables.jsonl")
