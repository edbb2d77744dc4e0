"""Table 1 and the per-run table from CSV fixtures whose winners are known."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
    return with_primary_metric(load_results(sorted(FIXTURES.glob("*.csv"))))


def test_task_and_primary_metric(results):
    assert set(results["task"]) == {"sql", "med", "fact"}
    assert set(results.loc[results.task == "sql", "metric_name"]) == {"execution_accuracy"}
    # The Gemma LoRA med row has no metric value (failed evaluation): dropped.
    assert not ((results.model == GEMMA) & (results["mode"] == "lora") & (results.task == "med")).any()


def test_best_of_sweep_and_bold(results):
    models, columns, cells = table1(results)
    assert models == [QWEN, GEMMA]
    assert columns[:4] == [("sql", "fft"), ("sql", "lora"), ("sql", "molf"), ("sql", "molf_e")]
    assert ("med", "dense_lora") in columns and columns.index(("med", "dense_lora")) == 8
    value, hparams, bold = cells[(QWEN, "med", "molf")]
    assert (value, bold) == (53.5, True)
    assert "lr 5e-05" in hparams and "lora lr 0.0005" in hparams and "sched cosine" in hparams
    assert cells[(QWEN, "med", "fft")][:1] == (52.0,) and not cells[(QWEN, "med", "fft")][2]
    assert cells[(GEMMA, "med", "fft")][2] and not cells[(GEMMA, "med", "molf")][2]
    assert cells[(QWEN, "sql", "lora")][2]
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
    latex = table1_latex(results)
    assert r"\multicolumn{4}{c}{SQL}" in latex and r"\multicolumn{5}{c}{MED}" in latex
    assert r"\textbf{53.50}" in latex and "dense\\_lora" in latex
    assert latex.count("{") == latex.count("}")


def test_metric_override_changes_the_table():
    results = with_primary_metric(load_results([FIXTURES / "fact.csv"]), {"fact": "efficacy_sequence"})
    _, _, cells = table1(results)
    # On whole-sequence efficacy FFT (88) beats MoLF, whose best run is now lr 5e-5 (85).
    assert cells[(QWEN, "fact", "molf")][:1] == (85.0,) and "lr 5e-05" in cells[(QWEN, "fact", "molf")][1]
    assert cells[(QWEN, "fact", "fft")][2] and not cells[(QWEN, "fact", "molf")][2]
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
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no results CSVs"):
        load_results([bench])
