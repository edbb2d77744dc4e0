"""build_train_dataset across tasks, layouts and file formats; subsampling; overlap."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from molf.data import DataConfig, build_train_dataset, load_examples
from molf.data.encoding import IGNORE_INDEX
from molf.data.io import MalformedRecordError, load_file
from molf.data.overlap import drop_overlap, find_overlap

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _cfg(**fields):
    return DataConfig(**fields)


@pytest.mark.parametrize("task, path", [("med", "med/train.jsonl"), ("sql", "sql/gretel_train.jsonl"),
                                        ("sql", "sql/sql_create_context.jsonl"), ("sql", "sql/spider_dev.jsonl"),
                                        ("fact", "fact/counterfact.jsonl")])
def test_labels_mask_exactly_the_prompt(tokenizer, task, path):
    cfg = _cfg(dataset_type=task, data_path=str(FIXTURES / path))
    dataset = build_train_dataset(cfg, tokenizer, seed=0)
    examples = load_examples(cfg, "train")
    assert len(dataset) == len(examples)
    row, example = dataset[0], examples[0]
    prompt_len = len(tokenizer(example.prompt, add_special_tokens=False)["input_ids"])
    assert row["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert tokenizer.decode(row["labels"][prompt_len:]) == example.target + tokenizer.eos_token
    assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_accepts_any_object_with_data_fields(tokenizer):
    cfg = SimpleNamespace(dataset_type="med", data_path=str(FIXTURES / "med"), eval_data_path=None,
                          num_train_samples=3, max_seq_length=None)
    assert len(build_train_dataset(cfg, tokenizer, seed=0)) == 3


def test_subsample_is_seeded(tokenizer):
    cfg = _cfg(dataset_type="med", data_path=str(FIXTURES / "med" / "train.jsonl"), num_train_samples=5)
    first = build_train_dataset(cfg, tokenizer, seed=1)["input_ids"]
    assert build_train_dataset(cfg, tokenizer, seed=1)["input_ids"] == first
    assert build_train_dataset(cfg, tokenizer, seed=2)["input_ids"] != first


def test_csv_parquet_json_load_the_same_rows(tmp_path, tokenizer):
    records = [row.fields for row in load_file(FIXTURES / "med" / "train.jsonl")]
    pd.DataFrame(records).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(records).to_parquet(tmp_path / "train.parquet")
    (tmp_path / "train.json").write_text(json.dumps(records))
    reference = build_train_dataset(_cfg(dataset_type="med", data_path=str(FIXTURES / "med" / "train.jsonl")),
                                    tokenizer, 0)
    for name in ("train.csv", "train.parquet", "train.json"):
        dataset = build_train_dataset(_cfg(dataset_type="med", data_path=str(tmp_path / name)), tokenizer, 0)
        assert dataset["input_ids"] == reference["input_ids"], name


def test_files_with_a_byte_order_mark_load_like_those_without(tmp_path, tokenizer):
    text = (FIXTURES / "med" / "train.jsonl").read_text(encoding="utf-8")
    (tmp_path / "train.jsonl").write_text(text, encoding="utf-8-sig")
    records = [row.fields for row in load_file(FIXTURES / "med" / "train.jsonl")]
    pd.DataFrame(records).to_csv(tmp_path / "train.csv", index=False, encoding="utf-8-sig")
    (tmp_path / "train.json").write_text(json.dumps(records), encoding="utf-8-sig")
    reference = build_train_dataset(_cfg(dataset_type="med", data_path=str(FIXTURES / "med" / "train.jsonl")),
                                    tokenizer, 0)
    for name in ("train.jsonl", "train.csv", "train.json"):
        dataset = build_train_dataset(_cfg(dataset_type="med", data_path=str(tmp_path / name)), tokenizer, 0)
        assert dataset["input_ids"] == reference["input_ids"], name


def test_a_null_parquet_cell_is_an_empty_field_not_the_text_nan(tmp_path):
    records = [row.fields for row in load_file(FIXTURES / "med" / "train.jsonl")][:3]
    records[1]["opa"] = None
    pd.DataFrame(records).to_parquet(tmp_path / "train.parquet")
    assert load_file(tmp_path / "train.parquet")[1].fields["opa"] is None
    with pytest.raises(ValueError, match="train.parquet row 1: field 'opa' is empty"):
        load_examples(_cfg(dataset_type="med", data_path=str(tmp_path / "train.parquet")), "train")


def test_counterfact_parquet_with_list_columns_loads_like_its_jsonl(tmp_path):
    # The original CounterFact layout: list columns, which parquet readers give back as numpy arrays.
    records = [{"case_id": i, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": f"Person {i}",
                                                    "target_new": {"str": "English"}, "target_true": {"str": "French"}},
                "paraphrase_prompts": [f"p{i} one", f"p{i} two"], "neighborhood_prompts": ["n1", "n2"]}
               for i in range(3)]
    (tmp_path / "cf.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pd.DataFrame(records).to_parquet(tmp_path / "cf.parquet")
    from_parquet = load_examples(_cfg(dataset_type="fact", data_path=str(tmp_path / "cf.parquet")), "train")
    assert from_parquet == load_examples(_cfg(dataset_type="fact", data_path=str(tmp_path / "cf.jsonl")), "train")
    assert from_parquet[2].rephrase_prompts == ("p2 one", "p2 two")


def test_max_seq_length_drops_rows_whose_target_cannot_fit(tokenizer, caplog):
    cfg = _cfg(dataset_type="sql", data_path=str(FIXTURES / "sql" / "gretel_train.jsonl"), max_seq_length=40)
    dataset = build_train_dataset(cfg, tokenizer, seed=0)
    assert 0 < len(dataset) < 10
    assert all(len(ids) <= 40 for ids in dataset["input_ids"])
    assert "exceeds max_seq_length=40" in caplog.text


def test_prompts_cut_to_fit_are_counted_in_a_warning(tokenizer, caplog):
    cfg = _cfg(dataset_type="med", data_path=str(FIXTURES / "med" / "train.jsonl"))
    lengths = [len(ids) for ids in build_train_dataset(cfg, tokenizer, seed=0)["input_ids"]]
    assert "cut the prompts" not in caplog.text  # no limit, nothing cut
    limit = sorted(lengths)[len(lengths) // 2]  # about half the rows are longer
    longer = [n for n in lengths if n > limit]
    build_train_dataset(_cfg(dataset_type="med", data_path=cfg.data_path, max_seq_length=limit), tokenizer, seed=0)
    assert (f"cut the prompts of {len(longer)} of {len(lengths)} training rows from the left to fit "
            f"max_seq_length={limit} (by {max(longer) - limit} tokens at most") in caplog.text


def test_encode_example_reports_the_tokens_it_cut():
    from molf.data.encoding import encode_example

    class Chars:  # one token per character, BOS added to plain text
        bos_token_id, eos_token_id = 1, 2

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}

    assert encode_example(Chars(), "abcdef", "xy", max_seq_length=6)["prompt_tokens_cut"] == 4
    assert encode_example(Chars(), "abcdef", "xy", max_seq_length=None)["prompt_tokens_cut"] == 0


def test_missing_path_and_empty_directory_are_clear_errors(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_train_dataset(_cfg(dataset_type="med", data_path=str(tmp_path / "nope.jsonl")), tokenizer, 0)
    with pytest.raises(FileNotFoundError, match="no train file"):
        build_train_dataset(_cfg(dataset_type="med", data_path=str(tmp_path)), tokenizer, 0)


def test_overlap_with_spider_dev_is_reported_and_dropped(tokenizer, caplog):
    train_path, eval_path = FIXTURES / "sql" / "sql_create_context.jsonl", FIXTURES / "sql" / "spider_dev.jsonl"
    cfg = _cfg(dataset_type="sql", data_path=str(train_path), eval_data_path=str(eval_path))
    train, evaluation = load_examples(cfg, "train"), load_examples(cfg, "eval")
    report = find_overlap(train, evaluation)
    assert report.num_train_rows_affected == 4 and len(report.shared_questions) == 4
    kept, _ = drop_overlap(train, evaluation)
    assert len(kept) == len(train) - 4
    assert find_overlap(kept, evaluation).shared_questions == ()
    assert len(build_train_dataset(cfg, tokenizer, 0)) == len(train)
    assert "pass --drop_eval_overlap True" in caplog.text
    cfg.drop_eval_overlap = True
    assert len(build_train_dataset(cfg, tokenizer, 0)) == len(train) - 4


def test_spider_paths_flags_override_the_default(tmp_path):
    shutil.copy(FIXTURES / "sql" / "spider_dev.jsonl", tmp_path / "dev.jsonl")
    cfg = _cfg(dataset_type="sql", data_path=str(tmp_path / "dev.jsonl"))
    with pytest.raises(FileNotFoundError, match="--spider_tables_path"):
        load_examples(cfg, "train")
    cfg.spider_tables_path = str(FIXTURES / "sql" / "spider_tables.jsonl")
    cfg.spider_databases_dir = str(FIXTURES / "sql" / "spider_databases")
    examples = load_examples(cfg, "train")
    assert examples[0].db_path.is_file()


def test_eval_source_never_falls_back_to_the_hub_for_local_training_data(tmp_path):
    from molf.data.builder import eval_source

    med_dir = FIXTURES / "med"
    assert eval_source(_cfg(dataset_type="med")) == (None, "eval")  # hub training, hub evaluation
    assert eval_source(_cfg(dataset_type="med", data_path=str(med_dir))) == (str(med_dir), "eval")
    assert len(load_examples(_cfg(dataset_type="med", data_path=str(med_dir)), "eval")) == \
        len(load_file(med_dir / "validation.jsonl"))
    fact_file = str(FIXTURES / "fact" / "counterfact.jsonl")
    assert eval_source(_cfg(dataset_type="fact", data_path=fact_file)) == (fact_file, "train")
    with pytest.raises(ValueError, match="--eval_data_path"):
        load_examples(_cfg(dataset_type="med", data_path=str(med_dir / "train.jsonl")), "eval")
    shutil.copy(med_dir / "train.jsonl", tmp_path / "train.jsonl")
    with pytest.raises(FileNotFoundError, match="no eval file in directory"):
        load_examples(_cfg(dataset_type="med", data_path=str(tmp_path)), "eval")


def test_overlap_is_checked_against_a_data_directory_eval_file_only_when_there_is_one(tmp_path, tokenizer, caplog):
    med_dir = FIXTURES / "med"
    train_rows = (med_dir / "train.jsonl").read_text().splitlines()
    shutil.copy(med_dir / "train.jsonl", tmp_path / "train.jsonl")
    (tmp_path / "validation.jsonl").write_text("\n".join(train_rows[:3]) + "\n")  # three training questions
    cfg = _cfg(dataset_type="med", data_path=str(tmp_path))
    assert len(build_train_dataset(cfg, tokenizer, 0)) == len(train_rows)
    assert "pass --drop_eval_overlap True" in caplog.text
    cfg.drop_eval_overlap = True
    assert len(build_train_dataset(cfg, tokenizer, 0)) == len(train_rows) - 3
    caplog.clear()
    # a local training file with no eval file: nothing to compare against, and no eval_source error
    cfg = _cfg(dataset_type="med", data_path=str(tmp_path / "train.jsonl"), drop_eval_overlap=True)
    assert len(build_train_dataset(cfg, tokenizer, 0)) == len(train_rows)
    assert "overlap" not in caplog.text.lower() and "eval" not in caplog.text.lower()


@pytest.mark.parametrize("name, text", [("train.jsonl", ""), ("train.jsonl", "\n\n"), ("train.json", "[]"),
                                        ("train.csv", "question,opa,opb,opc,opd,cop\n")])
def test_a_file_without_rows_is_a_clear_error(tmp_path, tokenizer, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(MalformedRecordError, match=rf"{name} holds no rows"):
        build_train_dataset(_cfg(dataset_type="med", data_path=str(tmp_path / name)), tokenizer, 0)
    with pytest.raises(MalformedRecordError, match=rf"{name} holds no rows"):
        load_examples(_cfg(dataset_type="sql", data_path=str(FIXTURES / "sql"), eval_data_path=str(tmp_path / name)),
                      "eval")


def test_json_array_errors_name_the_record_or_the_line(tmp_path):
    (tmp_path / "items.json").write_text('["What is the question?", "another"]')
    with pytest.raises(MalformedRecordError, match=r"items.json record 0: expected a JSON object, got str"):
        load_file(tmp_path / "items.json")
    rows = "[\n" + ",\n".join(['{"question": "q", "opa": "a"}'] * 5) + ",\n]\n"  # a trailing comma, line 7
    (tmp_path / "comma.json").write_text(rows)
    with pytest.raises(MalformedRecordError, match=r"comma.json:7: not valid JSON"):
        load_file(tmp_path / "comma.json")
    # a ".json" file of JSON lines still loads, and its broken line is named
    (tmp_path / "lines.json").write_text('{"a": 1}\n{"a": 2}\n{"a": \n')
    with pytest.raises(MalformedRecordError, match=r"lines.json:3: not valid JSON"):
        load_file(tmp_path / "lines.json")
    (tmp_path / "lines.json").write_text('{"a": 1}\n{"a": 2}\n')
    assert [row.fields["a"] for row in load_file(tmp_path / "lines.json")] == [1, 2]


def test_overlap_that_leaves_no_training_row_says_so(tmp_path, tokenizer):
    med_dir = FIXTURES / "med"
    shutil.copy(med_dir / "train.jsonl", tmp_path / "train.jsonl")
    shutil.copy(med_dir / "train.jsonl", tmp_path / "validation.jsonl")
    with pytest.raises(ValueError, match="dropped as an eval-set overlap"):
        build_train_dataset(_cfg(dataset_type="med", data_path=str(tmp_path), drop_eval_overlap=True), tokenizer, 0)
