"""The locked results-CSV appender: schema, concurrency, errors."""

from __future__ import annotations

import csv
import multiprocessing

import pytest

from molf.eval.results import (EVALUATOR_COLUMNS, RUN_COLUMNS, TASK_METRICS, append_row, build_row, check_task_file,
                               task_columns)

COLUMNS = ("worker", "index", "text")


def _append_many(path: str, worker: int) -> None:
    for index in range(50):
        # A comma, a quote and a newline in every row: interleaved writes would break the CSV.
        append_row(path, {"worker": worker, "index": index, "text": f'w{worker}, "row" {index}\nend'}, COLUMNS)


def test_eight_processes_append_400_intact_rows(tmp_path):
    path = tmp_path / "results.csv"
    # fork keeps the test fast (no re-import of torch in 8 children); the children only write files.
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(str(path), worker)) for worker in range(8)]
    for process in workers:
        process.start()
    for process in workers:
        process.join()
    assert all(process.exitcode == 0 for process in workers)
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 400
    assert {(int(r["worker"]), int(r["index"])) for r in rows} == {(w, i) for w in range(8) for i in range(50)}
    assert all(r["text"] == f'w{r["worker"]}, "row" {r["index"]}\nend' for r in rows)
    assert path.read_text().count("worker,index,text") == 1


def test_schema_mismatch_is_an_error(tmp_path):
    path = tmp_path / "r.csv"
    append_row(path, {"worker": 0, "index": 0, "text": "a"}, COLUMNS)
    with pytest.raises(ValueError, match="not this task's schema"):
        append_row(path, {"worker": 0, "index": 0}, ("worker", "index"))
    with pytest.raises(ValueError, match="missing \\['text'\\]"):
        append_row(path, {"worker": 0, "index": 0}, COLUMNS)
    assert len(path.read_text().splitlines()) == 2


def test_build_row_orders_columns_and_checks_run_info():
    run_info = {name: 1 for name in RUN_COLUMNS if name not in EVALUATOR_COLUMNS}
    row = build_row("med", run_info, {"accuracy": 50.0, "invalid_answers": 2, "extra": 1}, num_eval=4)
    assert set(row) == set(task_columns("med")) and row["num_eval"] == 4 and row["timestamp_utc"].endswith("Z")
    assert task_columns("sql")[-4:] == TASK_METRICS["sql"]
    with pytest.raises(ValueError, match="missing \\['seed'\\]"):
        build_row("med", {k: v for k, v in run_info.items() if k != "seed"}, {"accuracy": 1, "invalid_answers": 0}, 1)
    with pytest.raises(ValueError, match="lack \\['invalid_answers'\\]"):
        build_row("med", run_info, {"accuracy": 1}, 1)


def test_row_after_a_cut_short_last_line_starts_on_its_own_line(tmp_path):
    path = tmp_path / "r.csv"
    append_row(path, {"worker": 0, "index": 0, "text": "a"}, COLUMNS)
    with path.open("a") as handle:
        handle.write("1,1,cut sho")  # a writer killed mid-row
    append_row(path, {"worker": 2, "index": 2, "text": "b"}, COLUMNS)
    assert path.read_text().splitlines()[-2:] == ["1,1,cut sho", "2,2,b"]


def test_check_task_file_rejects_another_schema_before_anything_runs(tmp_path):
    assert check_task_file(tmp_path, "med") == tmp_path / "med.csv"  # no file yet: fine
    (tmp_path / "med.csv").write_text("run_name,accuracy\nold,50\n")
    with pytest.raises(ValueError, match="not this task's schema"):
        check_task_file(tmp_path, "med")
