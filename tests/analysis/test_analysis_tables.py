"""Table 1 and the per-run table from CSV fixtures whose winners are known."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from molf.analysis.tables import (
    best_per_cell,
    frame_latex,
    latex_escape,
    load_results,
    long_table,
    table1,
    table1_latex,
    table1_markdown,
    with_primary_metric,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "analysis"
QWEN, GEMMA = "Qwen/Qwen2.5-1.5B", "google/gemma-3-1b-pt"


@pytest.fixture
def results():
    # The Gemma LoRA med row has no metric value (a failed evaluation): dropped with a warning.
    with pytest.warns(UserWarning, match="dropped 1 row without a value of the primary metric"):
        return with_primary_metric(load_results(sorted(FIXTURES.glob("*.csv"))))


def _write_med(path: Path, rows: list[dict]) -> Path:
    """A med results CSV holding ``rows`` (run_name, mode, model, learning_rate, seed, accuracy, ...)."""
    defaults = {"timestamp_utc": "2026-11-23T10:00:00Z", "mode": "fft", "model": QWEN, "learning_rate": 5e-5,
                "seed": 42, "num_eval": 500}
    frame = pd.DataFrame([{**defaults, "checkpoint": f"ckpts/{row['run_name']}", **row} for row in rows])
    frame.to_csv(path, index=False)
    return path


def test_task_and_primary_metric(results):
    assert set(results["task"]) == {"sql", "med", "fact"}
    assert set(results.loc[results.task == "sql", "metric_name"]) == {"execution_accuracy"}
    assert not ((results.model == GEMMA) & (results["mode"] == "lora") & (results.task == "med")).any()


def test_best_of_sweep_and_bold(results):
    models, columns, cells = table1(results)
    assert models == [QWEN, GEMMA]
    assert columns[:4] == [("sql", "fft"), ("sql", "lora"), ("sql", "molf"), ("sql", "molf_e")]
    assert ("med", "dense_lora") in columns and columns.index(("med", "dense_lora")) == 8
    cell = cells[(QWEN, "med", "molf")]
    assert (cell.value, cell.n, cell.is_best) == (53.5, 1, True)
    assert "lr 5e-05" in cell.hparams and "lora lr 0.0005" in cell.hparams and "sched cosine" in cell.hparams
    assert "seed" not in cell.hparams
    assert cells[(QWEN, "med", "fft")].value == 52.0 and not cells[(QWEN, "med", "fft")].is_best
    assert cells[(GEMMA, "med", "fft")].is_best and not cells[(GEMMA, "med", "molf")].is_best
    assert cells[(QWEN, "sql", "lora")].is_best
    assert (GEMMA, "med", "lora") not in cells


def test_tie_goes_to_the_earliest_run(results):
    best = best_per_cell(results)
    fact_molf = best[(best.task == "fact") & (best["mode"] == "molf")].iloc[0]
    assert fact_molf.learning_rate == 1e-4


def test_markdown_and_latex(results):
    markdown = table1_markdown(results)
    lines = markdown.strip().splitlines()
    assert lines[0].startswith("| model | sql / FFT | sql / LoRA | sql / MoLF | sql / MoLF-E | med / FFT")
    assert len(lines) == 2 + 2 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert "**53.50**" in markdown and "**52.00**" not in markdown
    # One seed per configuration: no spread shown.
    assert "±" not in markdown and "n=" not in markdown
    latex = table1_latex(results)
    assert r"\multicolumn{4}{c}{SQL}" in latex and r"\multicolumn{5}{c}{MED}" in latex
    assert r"\textbf{53.50}" in latex and "dense\\_lora" in latex
    assert latex.count("{") == latex.count("}") and r"\pm" not in latex


def test_metric_override_changes_the_table():
    results = with_primary_metric(load_results([FIXTURES / "fact.csv"]), {"fact": "efficacy_sequence"})
    _, _, cells = table1(results)
    # On whole-sequence efficacy FFT (88) beats MoLF, whose best run is now lr 5e-5 (85).
    assert cells[(QWEN, "fact", "molf")].value == 85.0 and "lr 5e-05" in cells[(QWEN, "fact", "molf")].hparams
    assert cells[(QWEN, "fact", "fft")].is_best and not cells[(QWEN, "fact", "molf")].is_best
    with pytest.raises(ValueError, match="--metric"):
        with_primary_metric(load_results([FIXTURES / "fact.csv"]), {"fact": "no_such_column"})


def test_long_table_order(results):
    runs = long_table(results)
    med_qwen_fft = runs[(runs.task == "med") & (runs.model == QWEN) & (runs["mode"] == "fft")]
    assert list(med_qwen_fft.metric) == [52.0, 51.0, 50.0]
    assert list(runs.task.drop_duplicates()) == ["sql", "med", "fact"]
    assert r"run\_name" in frame_latex(runs)


def test_latex_escape():
    assert latex_escape("a_b & 5% {x}") == r"a\_b \& 5\% \{x\}"


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="results"):
        load_results([FIXTURES / "nope.csv"])


def test_cli(tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_tables.py"),
                             *map(str, sorted(FIXTURES.glob("*.csv"))), "-o", str(tmp_path), "--format", "both"],
                            capture_output=True, text=True, check=True)
    assert "**53.50**" in result.stdout and r"\textbf{53.50}" in result.stdout
    assert {p.name for p in tmp_path.iterdir()} == {"table1.md", "table1.tex", "runs.md", "runs.tex"}


def test_other_csvs_in_the_glob_are_skipped_with_a_warning(tmp_path):
    bench = tmp_path / "bench_train.csv"
    bench.write_text("mode,median_step_time_s\nfft,0.4\n")
    with pytest.warns(UserWarning, match="skipped .*bench_train.csv: not evaluation results"):
        results = load_results([bench, FIXTURES / "fact.csv"])
    assert set(results["task"]) == {"fact"}


def test_only_skipped_csvs_is_an_error_that_says_so(tmp_path):
    bench = tmp_path / "bench_train.csv"
    bench.write_text("mode,median_step_time_s\nfft,0.4\n")
    with pytest.raises(ValueError, match="none of the CSVs given holds evaluation results: .*bench_train.csv is not"):
        load_results([bench])
    with pytest.raises(ValueError, match="no results CSVs given"):
        load_results([])


def test_seeds_are_averaged_and_the_best_mean_wins(tmp_path):
    # lr 1e-4 has the luckiest seed (60) but the lower mean (52.5); lr 5e-5 has the best mean (54.5).
    path = _write_med(tmp_path / "med.csv", [
        {"run_name": "a-s1", "learning_rate": 1e-4, "seed": 1, "accuracy": 60.0},
        {"run_name": "a-s2", "learning_rate": 1e-4, "seed": 2, "accuracy": 45.0},
        {"run_name": "b-s1", "learning_rate": 5e-5, "seed": 1, "accuracy": 55.0},
        {"run_name": "b-s2", "learning_rate": 5e-5, "seed": 2, "accuracy": 54.0},
        {"run_name": "lora-s1", "mode": "lora", "learning_rate": None, "seed": 1, "accuracy": 50.0},
    ])
    results = with_primary_metric(load_results([path]))
    markdown = table1_markdown(results)
    assert "**54.50** ± 0.71 (n=2)<br>(lr 5e-05)" in markdown
    assert "| 50.00 |" in markdown  # one run: no spread
    assert r"\textbf{54.50} $\pm$ 0.71 (n=2)" in table1_latex(results)
    _, _, cells = table1(results)
    cell = cells[(QWEN, "med", "fft")]
    assert (cell.value, cell.n, cell.is_best) == (54.5, 2, True)
    assert cell.std == pytest.approx(0.5 ** 0.5)  # sample std of 55 and 54
    assert cell.hparams == "lr 5e-05"
    assert cells[(QWEN, "med", "lora")].n == 1
    # The per-run table still lists every run.
    assert len(long_table(results)) == 5


def test_latest_evaluation_of_a_run_wins(tmp_path):
    # "a" was evaluated twice: the later evaluation (40, first in the file) replaces the earlier (70).
    path = _write_med(tmp_path / "med.csv", [
        {"run_name": "a", "timestamp_utc": "2026-11-23T12:00:00Z", "learning_rate": 1e-4, "accuracy": 40.0},
        {"run_name": "b", "timestamp_utc": "2026-11-23T11:00:00Z", "learning_rate": 5e-5, "accuracy": 50.0},
        {"run_name": "a", "timestamp_utc": "2026-11-23T10:00:00Z", "learning_rate": 1e-4, "accuracy": 70.0},
    ])
    results = with_primary_metric(load_results([path]))
    assert sorted(results.run_name) == ["a", "b"] and results.loc[results.run_name == "a", "metric"].item() == 40.0
    _, _, cells = table1(results)
    assert cells[(QWEN, "med", "fft")][:3] == (50.0, pytest.approx(float("nan"), nan_ok=True), 1)
    assert "lr 5e-05" in cells[(QWEN, "med", "fft")].hparams


def test_bold_is_by_the_printed_value(tmp_path):
    path = _write_med(tmp_path / "med.csv", [
        {"run_name": "fft", "mode": "fft", "accuracy": 50.004},
        {"run_name": "lora", "mode": "lora", "accuracy": 50.001},
        {"run_name": "molf", "mode": "molf", "accuracy": 49.990},
    ])
    results = with_primary_metric(load_results([path]))
    assert table1_markdown(results).count("**50.00**") == 2
    _, _, cells = table1(results)
    assert [cells[(QWEN, "med", m)].is_best for m in ("fft", "lora", "molf")] == [True, True, False]
    _, _, cells = table1(results, digits=3)
    assert [cells[(QWEN, "med", m)].is_best for m in ("fft", "lora", "molf")] == [True, False, False]
    assert "**50.004**" in table1_markdown(results, digits=3) and "**50.001**" not in table1_markdown(results, 3)


def test_dropped_rows_are_named_in_a_warning(tmp_path):
    path = _write_med(tmp_path / "med.csv", [
        {"run_name": "ok", "accuracy": 50.0},
        {"run_name": "failed-eval", "accuracy": None},
        {"run_name": "no-mode", "mode": None, "accuracy": 51.0},
        {"run_name": "no-model", "model": " ", "accuracy": 52.0},
    ])
    with pytest.warns(UserWarning) as record:
        results = with_primary_metric(load_results([path]))
    messages = [str(w.message) for w in record]
    assert any(m.startswith("dropped 2 rows with an empty model or mode") and "med.csv (no-mode, no-model)" in m
               for m in messages), messages
    assert any(m.startswith("dropped 1 row without a value of the primary metric") and "(failed-eval)" in m
               for m in messages), messages
    assert list(results.run_name) == ["ok"]


def _run_make_tables(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_tables.py"), *args],
                          capture_output=True, text=True)


def test_csv_without_a_model_column_is_a_one_line_error(tmp_path):
    path = tmp_path / "med.csv"
    pd.read_csv(FIXTURES / "med.csv").drop(columns="model").to_csv(path, index=False)
    with pytest.raises(ValueError, match="med.csv has no 'model' column"):
        load_results([path])
    result = _run_make_tables(str(path))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {path} has no 'model' column; a results CSV has the "
                                                  "evaluators' columns (README, 'Results CSVs')"]
    pd.read_csv(FIXTURES / "med.csv").drop(columns=["mode"]).to_csv(path, index=False)
    assert "has no 'mode' column" in _run_make_tables(str(path)).stderr


def test_metric_override_for_an_unknown_task_is_an_error():
    result = _run_make_tables(str(FIXTURES / "med.csv"), "--metric", "mde=accuracy")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --metric 'mde=accuracy': unknown task 'mde'; the tasks are " \
                                    "['fact', 'med', 'sql']"


def test_a_bar_in_a_model_name_does_not_split_a_markdown_cell(tmp_path):
    path = tmp_path / "med.csv"
    frame = pd.read_csv(FIXTURES / "med.csv")
    frame["model"] = "org/model|v2"
    frame.to_csv(path, index=False)
    with pytest.warns(UserWarning, match="dropped 1 row without a value"):  # the fixture's failed evaluation
        table = table1_markdown(with_primary_metric(load_results([path]), {}))
    header, _, first = table.splitlines()[:3]
    assert "model\\|v2" in first and first.count(" | ") - first.count("\\| ") == header.count(" | ")


def test_a_row_cut_inside_a_quoted_field_hides_no_other_row(tmp_path):
    path = _write_med(tmp_path / "med.csv", [
        {"run_name": "a", "other_hparams": '{"data": 1}', "accuracy": 40.0},
        {"run_name": "b", "other_hparams": '{"data": 2}', "accuracy": 50.0},
        {"run_name": "c", "other_hparams": '{"data": 3}', "accuracy": 60.0},
    ])
    lines = path.read_text().splitlines()
    cut = lines[2][:lines[2].index('"{') + 5]  # a writer killed inside the quoted JSON of row "b"
    path.write_text("\n".join([lines[0], lines[1], cut, lines[3]]) + "\n")
    with pytest.warns(UserWarning, match="left out line\\(s\\) 3, which do not have the header's"):
        results = load_results([path])
    assert results.run_name.tolist() == ["a", "c"] and results.source_line.tolist() == [2, 4]
    assert results.accuracy.tolist() == [40.0, 60.0]


def test_a_count_of_failures_ranks_lowest_first(tmp_path):
    path = _write_med(tmp_path / "med.csv", [
        {"run_name": "fft-a", "mode": "fft", "learning_rate": 1e-4, "accuracy": 50.0, "invalid_answers": 9},
        {"run_name": "fft-b", "mode": "fft", "learning_rate": 5e-5, "accuracy": 40.0, "invalid_answers": 3},
        {"run_name": "lora", "mode": "lora", "accuracy": 45.0, "invalid_answers": 5},
    ])
    results = with_primary_metric(load_results([path]), {"med": "invalid_answers"})
    _, _, cells = table1(results)
    assert cells[(QWEN, "med", "fft")].value == 3 and "lr 5e-05" in cells[(QWEN, "med", "fft")].hparams
    assert cells[(QWEN, "med", "fft")].is_best and not cells[(QWEN, "med", "lora")].is_best
    assert list(long_table(results).metric) == [3, 9, 5]  # fft runs best first, then lora
    accuracy = table1(with_primary_metric(load_results([path])))[2]
    assert accuracy[(QWEN, "med", "fft")].value == 50.0 and accuracy[(QWEN, "med", "fft")].is_best
