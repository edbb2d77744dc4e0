"""Results CSVs -> the paper's Table-1 layout and a per-run long table, as Markdown or LaTeX.

Table 1: one row per model; columns task x method (FFT / LoRA / MoLF / MoLF-E, then any other mode
found). Each cell is the best configuration of that sweep: runs that differ only in their seed are
one configuration, scored by the mean of the task's primary metric over its runs (a run evaluated
more than once counts with its latest evaluation). A cell shows that mean (± the sample std and the
number of runs when there are several) and the hyperparameters that set the configuration apart;
within each (model, task) the methods whose printed value equals the best printed value are bold.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Union

import pandas as pd

from molf.eval.results import TASK_METRICS, read_lines

PRIMARY_METRICS = {task: names[0] for task, names in TASK_METRICS.items()}  # what a task's rows are ranked by
# Metrics where less is better (counts of failures); every other metric ranks higher first.
LOWER_IS_BETTER = frozenset({"invalid_answers"})
METHODS = {"fft": "FFT", "lora": "LoRA", "molf": "MoLF", "molf_e": "MoLF-E"}
TASK_ORDER = ["sql", "med", "fact"]

# Hyperparameters shown in a cell for each mode, even when the sweep did not vary them.
MODE_HPARAMS = {
    "fft": ["learning_rate"],
    "lora": ["lora_learning_rate", "lora_rank"],
    "molf": ["learning_rate", "lora_learning_rate"],
    "molf_e": ["lora_learning_rate", "molf_lora_ranks"],
}
# Hyperparameters shown when they vary within a (model, task, mode) sweep.
SWEEP_HPARAMS = ["learning_rate", "lora_learning_rate", "weight_decay", "lora_weight_decay", "lora_rank",
                 "molf_lora_ranks", "molf_topk", "molf_score_fn", "lr_scheduler_type", "warm_up_ratio",
                 "num_train_epochs", "per_device_batch_size", "gradient_accumulation_steps"]
HPARAM_ABBREV = {"learning_rate": "lr", "lora_learning_rate": "lora lr", "weight_decay": "wd",
                 "lora_weight_decay": "lora wd", "lora_rank": "r", "molf_lora_ranks": "ranks",
                 "molf_topk": "K", "molf_score_fn": "score", "lr_scheduler_type": "sched",
                 "warm_up_ratio": "warmup", "num_train_epochs": "epochs", "per_device_batch_size": "bs",
                 "gradient_accumulation_steps": "GA"}
_METRIC_TASK = {metric: task for task, metric in PRIMARY_METRICS.items()}
# Columns every results CSV must have: a row is placed in Table 1 by its model and mode.
REQUIRED_COLUMNS = ("model", "mode")
# Where load_results found each row (for warnings about dropped rows).
SOURCE_COLUMNS = ("source_file", "source_line")
# Columns that tell runs of one configuration apart, or measure them: not part of the configuration.
_NOT_CONFIGURATION = {"seed", "run_name", "checkpoint", "timestamp_utc", "metric", "metric_name", *SOURCE_COLUMNS,
                      *(name for names in TASK_METRICS.values() for name in names)}


def _task_of(path: Path, frame: pd.DataFrame) -> Optional[str]:
    if path.stem in PRIMARY_METRICS:
        return path.stem
    for metric, task in _METRIC_TASK.items():
        if metric in frame.columns:
            return task
    return None


def load_results(paths: Iterable[Union[str, Path]]) -> pd.DataFrame:
    """Concatenate results CSVs, adding ``task`` (from the file name, else the metric columns) and
    ``source_file`` / ``source_line`` (where each row came from).

    Other CSVs matched by a glob such as ``results/*.csv`` (benchmarks) are skipped with a warning.

    Raises:
        FileNotFoundError: a path that is not a file.
        ValueError: a results CSV lacks a ``model`` or ``mode`` column, or no path is a results CSV.
    """
    frames, skipped = [], []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"no results CSV at {path}; the evaluators write results/<task>.csv")
        header, rows, torn = read_lines(path)
        if torn:
            warnings.warn(f"{path}: left out line(s) {', '.join(map(str, torn))}, which do not have the header's "
                          f"{len(header)} fields (rows cut short by a killed writer)", stacklevel=2)
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(header)
        buffer.write("\n".join(line for _, line in rows))
        frame = pd.read_csv(io.StringIO(buffer.getvalue())) if header else pd.DataFrame()
        task = _task_of(path, frame)
        if task is None:
            skipped.append(str(path))
            continue
        absent = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
        if absent:
            raise ValueError(f"{path} has no {' and no '.join(map(repr, absent))} column; a results CSV has the "
                             "evaluators' columns (README, 'Results CSVs')")
        frames.append(frame.assign(task=task, source_file=str(path), source_line=[number for number, _ in rows]))
    reason = (f"not evaluation results (named sql/med/fact.csv or with one of the columns "
              f"{sorted(_METRIC_TASK)})")
    if not frames:
        if skipped:
            raise ValueError(f"none of the CSVs given holds evaluation results: {', '.join(skipped)} "
                             f"{'is' if len(skipped) == 1 else 'are'} {reason}")
        raise ValueError("no results CSVs given: pass the evaluators' CSVs, e.g. results/*.csv or results/demo/*.csv")
    if skipped:
        warnings.warn(f"skipped {', '.join(skipped)}: {reason}", stacklevel=2)
    return pd.concat(frames, ignore_index=True)


def latest_evaluations(results: pd.DataFrame) -> pd.DataFrame:
    """Keep the latest evaluation of each run: of the rows with the same task and ``run_name``, the one
    with the latest ``timestamp_utc`` (the last one in the files when timestamps are equal or missing).

    Rows without a run name are all kept; the order of the rows is kept.
    """
    if "run_name" not in results.columns:
        return results
    named = ~_blank(results["run_name"])
    time = _timestamps(results)
    # A stable sort keeps the file order among equal (or missing, sorted first) timestamps.
    by_time = results.assign(_time=time)[named].sort_values("_time", kind="stable", na_position="first")
    latest = by_time.drop_duplicates(["task", "run_name"], keep="last").index
    return results[~named | results.index.isin(latest)]


def _timestamps(results: pd.DataFrame) -> pd.Series:
    """The rows' ``timestamp_utc`` as UTC datetimes; NaT where it is missing or unreadable."""
    if "timestamp_utc" not in results.columns:
        return pd.Series(pd.NaT, index=results.index, dtype="datetime64[ns, UTC]")
    return pd.to_datetime(results["timestamp_utc"], utc=True, errors="coerce", format="ISO8601")


def _is_blank(value) -> bool:
    return bool(pd.isna(value)) or not str(value).strip()


def _blank(values: pd.Series) -> pd.Series:
    return values.map(_is_blank).astype(bool)


def _row_labels(rows: pd.DataFrame, limit: int = 10) -> str:
    """``file (run_a, run_b, ...)`` per source file of ``rows``; a row without a run name by its line."""
    files = rows["source_file"] if "source_file" in rows.columns else pd.Series("results", index=rows.index)
    parts = []
    for source, group in rows.groupby(files, sort=False):
        labels = [f"line {row.get('source_line', '?')}" if _is_blank(row.get("run_name")) else str(row["run_name"])
                  for _, row in group.iterrows()]
        more = f", ... {len(labels) - limit} more" if len(labels) > limit else ""
        parts.append(f"{source} ({', '.join(labels[:limit])}{more})")
    return "; ".join(parts)


def _drop_with_warning(results: pd.DataFrame, drop: pd.Series, reason: str) -> pd.DataFrame:
    if drop.any():
        count = int(drop.sum())
        warnings.warn(f"dropped {count} row{'s' if count > 1 else ''} {reason}: {_row_labels(results[drop])}",
                      stacklevel=3)
    return results[~drop]


def with_primary_metric(results: pd.DataFrame, metrics: Optional[dict[str, str]] = None) -> pd.DataFrame:
    """The rows the tables use: the latest evaluation of each run (``latest_evaluations``), with
    ``metric`` (the task's primary metric value) and ``metric_name`` added.

    Rows with an empty model or mode, or without a value of the primary metric (a failed evaluation),
    cannot be placed in a table: they are dropped with a warning naming their files and run names.

    Raises:
        ValueError: a task's metric column is not in the results.
    """
    metrics = {**PRIMARY_METRICS, **(metrics or {})}
    results = latest_evaluations(results).copy()
    names = results["task"].map(metrics)
    missing = sorted({m for m in names.dropna().unique() if m not in results.columns})
    if missing:
        raise ValueError(f"metric column(s) {missing} not in the results; choose another with "
                         "--metric TASK=COLUMN")
    values = [results.at[i, name] if isinstance(name, str) else math.nan for i, name in names.items()]
    results["metric_name"] = names
    results["metric"] = pd.to_numeric(pd.Series(values, index=results.index), errors="coerce")
    results = _drop_with_warning(results, _blank(results["model"]) | _blank(results["mode"]),
                                 "with an empty model or mode")
    return _drop_with_warning(results, results["metric"].isna(),
                              "without a value of the primary metric (failed evaluations?)")


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}" if not value.is_integer() or abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _cell_hparams(group: pd.DataFrame, best: pd.Series) -> str:
    mode = best["mode"]
    shown = [c for c in MODE_HPARAMS.get(mode, []) if c in group.columns]
    shown += [c for c in SWEEP_HPARAMS if c in group.columns and c not in shown and group[c].nunique() > 1]
    return ", ".join(f"{HPARAM_ABBREV.get(c, c)} {_format_value(best[c])}" for c in shown if pd.notna(best[c]))


def configuration_columns(results: pd.DataFrame) -> list[str]:
    """The columns that make a configuration: all but the seed, run name, checkpoint, timestamp, the
    metrics (every task's metric columns and the primary metric chosen) and where a row came from."""
    metric_columns = set(results["metric_name"].dropna()) if "metric_name" in results.columns else set()
    return [c for c in results.columns if c not in _NOT_CONFIGURATION and c not in metric_columns]


def configurations(results: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (in order of first appearance): its ``configuration_columns``,
    ``metric`` (the mean over its runs), ``metric_std`` (the sample std; NaN for one run), ``num_runs``
    and ``first_run`` (the earliest ``timestamp_utc`` of its runs; NaT when unknown)."""
    columns = configuration_columns(results)
    frame = results.reset_index(drop=True)
    # dropna=False: an empty hyperparameter (a mode that does not use it) is a value like any other.
    codes = frame.groupby(columns, dropna=False, sort=False).ngroup() if columns else \
        pd.Series(0, index=frame.index)  # numbered in order of first appearance
    time = _timestamps(frame)
    metric = frame["metric"].groupby(codes)  # groups 0, 1, ...: the order of ``first``'s rows
    first = frame.loc[~codes.duplicated(), columns + ["metric_name"]].reset_index(drop=True)
    return first.assign(metric=metric.mean(), metric_std=metric.std(ddof=1), num_runs=metric.size(),
                        first_run=time.groupby(codes).min())


def _direction(metric_names: pd.Series) -> pd.Series:
    """+1 where a higher value of the row's metric is better, -1 where a lower one is."""
    return metric_names.map(lambda name: -1.0 if name in LOWER_IS_BETTER else 1.0).astype(float)


def best_per_cell(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, task, mode): the configuration with the best mean primary metric over its
    runs (the highest, or the lowest for ``LOWER_IS_BETTER`` metrics; on ties the one whose first run
    is the earliest), as ``configurations`` gives it, with ``hparams`` (the text under its value in
    Table 1)."""
    configs = configurations(results)
    # pandas applies ``kind`` to one-column sorts only: the explicit position keeps ties in first-appearance order.
    configs["_order"] = range(len(configs))
    configs["_rank"] = configs["metric"] * _direction(configs["metric_name"])
    order = configs.sort_values(["_rank", "first_run", "_order"], ascending=[False, True, True], kind="stable",
                                na_position="last")
    best = order.groupby(["model", "task", "mode"], sort=False).head(1).drop(columns=["_order", "_rank"])
    best = best.assign(hparams=[_cell_hparams(results[(results.model == r.model) & (results.task == r.task)
                                                      & (results["mode"] == r["mode"])], r)
                                for _, r in best.iterrows()])
    return best.reset_index(drop=True)


def _ordered(values: Iterable[str], preferred: list[str]) -> list[str]:
    values = list(dict.fromkeys(values))
    return [v for v in preferred if v in values] + sorted(v for v in values if v not in preferred)


class Cell(NamedTuple):
    """A Table-1 cell: the mean of the best configuration's runs, their sample std (NaN for one run),
    the number of runs, the hyperparameters shown and whether the cell is bold."""

    value: float
    std: float
    n: int
    hparams: str
    is_best: bool


def _printed(value: float, digits: int) -> str:
    return f"{value:.{digits}f}"


def table1(results: pd.DataFrame, digits: int = 2) -> tuple[list[str], list[tuple[str, str]], dict]:
    """``(models, columns [(task, mode)], cells {(model, task, mode): Cell})``.

    A cell is bold when its value printed with ``digits`` decimals equals the best printed value of its
    model and task, so methods that tie on the page are all bold.
    """
    best = best_per_cell(results)
    models = list(dict.fromkeys(best["model"]))
    tasks = _ordered(best["task"], TASK_ORDER)
    columns = [(task, mode) for task in tasks
               for mode in _ordered(best.loc[best.task == task, "mode"], list(METHODS))]
    cells = {}
    for (model, task), group in best.groupby(["model", "task"], sort=False):
        printed = group["metric"].map(lambda value: float(_printed(value, digits))) * _direction(group["metric_name"])
        for (_, row), shown in zip(group.iterrows(), printed):
            cells[(model, task, row["mode"])] = Cell(row["metric"], row["metric_std"], int(row["num_runs"]),
                                                     row["hparams"], shown == printed.max())
    return models, columns, cells


def _method(mode: str) -> str:
    return METHODS.get(mode, mode)


def _formatted_cells(model: str, columns, cells, digits: int, missing: str, bold, spread, annotate) -> list[str]:
    """One Table-1 row's cells: the value (``bold`` when best), its ``spread`` over several runs, and
    the hyperparameters (``annotate``)."""
    row = []
    for task, mode in columns:
        cell = cells.get((model, task, mode))
        if cell is None:
            row.append(missing)
            continue
        text = _printed(cell.value, digits)
        text = bold(text) if cell.is_best else text
        text += spread(_printed(cell.std, digits), cell.n) if cell.n > 1 else ""
        row.append(annotate(text, cell.hparams) if cell.hparams else text)
    return row


def table1_markdown(results: pd.DataFrame, digits: int = 2) -> str:
    """Table 1 as a Markdown table (headers ``task / method``; hyperparameters under each value)."""
    models, columns, cells = table1(results, digits)
    header = ["model"] + [f"{task} / {_method(mode)}" for task, mode in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in models:
        row = [model] + _formatted_cells(model, columns, cells, digits, missing="–",
                                         bold=lambda text: f"**{text}**",
                                         spread=lambda std, n: f" ± {std} (n={n})",
                                         annotate=lambda text, hparams: f"{text}<br>({hparams})")
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")  # a '|' would split the cell
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters in plain text (one pass, so replacements are not re-escaped)."""
    return "".join(_LATEX_SPECIAL.get(char, char) for char in text)


def table1_latex(results: pd.DataFrame, digits: int = 2) -> str:
    """Table 1 as a booktabs ``tabular`` with one multicolumn header per task."""
    models, columns, cells = table1(results, digits)
    tasks = list(dict.fromkeys(task for task, _ in columns))
    spans = [sum(1 for t, _ in columns if t == task) for task in tasks]
    lines = [r"\begin{tabular}{l" + "c" * len(columns) + "}", r"\toprule"]
    lines.append("Model & " + " & ".join(rf"\multicolumn{{{n}}}{{c}}{{{latex_escape(task.upper())}}}"
                                         for task, n in zip(tasks, spans)) + r" \\")
    start = 2
    rules = []
    for n in spans:
        rules.append(rf"\cmidrule(lr){{{start}-{start + n - 1}}}")
        start += n
    lines.append(" ".join(rules))
    lines.append(" & " + " & ".join(latex_escape(_method(mode)) for _, mode in columns) + r" \\")
    lines.append(r"\midrule")
    for model in models:
        row = [latex_escape(model)] + _formatted_cells(
            model, columns, cells, digits, missing="--", bold=lambda text: rf"\textbf{{{text}}}",
            spread=lambda std, n: rf" $\pm$ {std} (n={n})",
            annotate=lambda text, hparams: rf"\makecell{{{text}\\ {{\scriptsize {latex_escape(hparams)}}}}}")
        lines.append(" & ".join(row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


LONG_COLUMNS = ["task", "model", "mode", "run_name", "learning_rate", "lora_learning_rate", "lora_rank",
                "molf_lora_ranks", "molf_topk", "lr_scheduler_type", "seed", "metric_name", "metric"]


def long_table(results: pd.DataFrame) -> pd.DataFrame:
    """Every run, one row each: task, model, mode, hyperparameters, primary metric; best first per group."""
    frame = results.copy()
    frame["_task"] = frame["task"].map({t: i for i, t in enumerate(TASK_ORDER)}).fillna(len(TASK_ORDER))
    frame["_mode"] = frame["mode"].map({m: i for i, m in enumerate(METHODS)}).fillna(len(METHODS))
    frame["_rank"] = frame["metric"] * _direction(frame["metric_name"])
    frame = frame.sort_values(["_task", "task", "model", "_mode", "mode", "_rank"],
                              ascending=[True, True, True, True, True, False], kind="stable")
    return frame[[c for c in LONG_COLUMNS if c in frame.columns]].reset_index(drop=True)


def frame_markdown(frame: pd.DataFrame, digits: int = 2) -> str:
    """A DataFrame as a Markdown table (floats of the ``metric`` column with ``digits`` decimals)."""
    def fmt(column: str, value) -> str:
        if pd.isna(value):
            return ""
        return f"{value:.{digits}f}" if column == "metric" else _format_value(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(fmt(c, row[c]).replace("|", "\\|") for c in frame.columns) + " |")
    return "\n".join(lines) + "\n"


def frame_latex(frame: pd.DataFrame, digits: int = 2) -> str:
    """A DataFrame as a booktabs ``tabular``."""
    def fmt(column: str, value) -> str:
        if pd.isna(value):
            return ""
        return f"{value:.{digits}f}" if column == "metric" else latex_escape(_format_value(value))

    lines = [r"\begin{tabular}{" + "l" * len(frame.columns) + "}", r"\toprule",
             " & ".join(latex_escape(c) for c in frame.columns) + r" \\", r"\midrule"]
    for _, row in frame.iterrows():
        lines.append(" & ".join(fmt(c, row[c]) for c in frame.columns) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"
