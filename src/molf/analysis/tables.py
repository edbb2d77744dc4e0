"""Results CSVs -> the paper's Table-1 layout and a per-run long table, as Markdown or LaTeX.

Table 1: one row per model; columns task x method (FFT / LoRA / MoLF / MoLF-E, then any other mode
found); each cell is the best run of that sweep by the task's primary metric, with the
hyperparameters that picked it; within each (model, task) the best method is in bold.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Iterable, Optional, Union

import pandas as pd

PRIMARY_METRICS = {"sql": "execution_accuracy", "med": "accuracy", "fact": "efficacy_first_token"}
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
                 "num_train_epochs", "per_device_batch_size", "gradient_accumulation_steps", "seed"]
HPARAM_ABBREV = {"learning_rate": "lr", "lora_learning_rate": "lora lr", "weight_decay": "wd",
                 "lora_weight_decay": "lora wd", "lora_rank": "r", "molf_lora_ranks": "ranks",
                 "molf_topk": "K", "molf_score_fn": "score", "lr_scheduler_type": "sched",
                 "warm_up_ratio": "warmup", "num_train_epochs": "epochs", "per_device_batch_size": "bs",
                 "gradient_accumulation_steps": "GA", "seed": "seed"}
_METRIC_TASK = {metric: task for task, metric in PRIMARY_METRICS.items()}


def _task_of(path: Path, frame: pd.DataFrame) -> Optional[str]:
    if path.stem in PRIMARY_METRICS:
        return path.stem
    for metric, task in _METRIC_TASK.items():
        if metric in frame.columns:
            return task
    return None


def load_results(paths: Iterable[Union[str, Path]]) -> pd.DataFrame:
    """Concatenate results CSVs, adding a ``task`` column (from the file name, else the metric columns).

    Other CSVs matched by a glob such as ``results/*.csv`` (benchmarks) are skipped with a warning.

    Raises:
        FileNotFoundError: a path that is not a file.
        ValueError: no path is a results CSV.
    """
    frames, skipped = [], []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"no results CSV at {path}; the evaluators write results/<task>.csv")
        frame = pd.read_csv(path)
        task = _task_of(path, frame)
        if task is None:
            skipped.append(str(path))
            continue
        frames.append(frame.assign(task=task))
    if skipped:
        warnings.warn(f"skipped {', '.join(skipped)}: not evaluation results (named sql/med/fact.csv or with "
                      f"one of the columns {sorted(_METRIC_TASK)})", stacklevel=2)
    if not frames:
        raise ValueError("no results CSVs given: pass the evaluators' CSVs, e.g. results/*.csv or results/demo/*.csv")
    return pd.concat(frames, ignore_index=True)


def with_primary_metric(results: pd.DataFrame, metrics: Optional[dict[str, str]] = None) -> pd.DataFrame:
    """Add ``metric`` (the task's primary metric value) and ``metric_name``; drop rows without one."""
    metrics = {**PRIMARY_METRICS, **(metrics or {})}
    results = results.copy()
    names = results["task"].map(metrics)
    missing = sorted({m for m in names.dropna().unique() if m not in results.columns})
    if missing:
        raise ValueError(f"metric column(s) {missing} not in the results; choose another with "
                         "--metric TASK=COLUMN")
    values = [results.at[i, name] if isinstance(name, str) else math.nan for i, name in names.items()]
    results["metric_name"] = names
    results["metric"] = pd.to_numeric(pd.Series(values, index=results.index), errors="coerce")
    return results.dropna(subset=["metric"])


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}" if not value.is_integer() or abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _cell_hparams(group: pd.DataFrame, best: pd.Series) -> str:
    mode = best["mode"]
    shown = [c for c in MODE_HPARAMS.get(mode, []) if c in group.columns]
    shown += [c for c in SWEEP_HPARAMS if c in group.columns and c not in shown and group[c].nunique() > 1]
    return ", ".join(f"{HPARAM_ABBREV.get(c, c)} {_format_value(best[c])}" for c in shown if pd.notna(best[c]))


def best_per_cell(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, task, mode): the run with the highest primary metric (earliest on ties)."""
    keys = ["metric", "timestamp_utc"] if "timestamp_utc" in results.columns else ["metric"]
    order = results.sort_values(keys, ascending=[False, True][: len(keys)], kind="stable")
    best = order.groupby(["model", "task", "mode"], sort=False).head(1)
    best = best.assign(hparams=[_cell_hparams(results[(results.model == r.model) & (results.task == r.task)
                                                      & (results["mode"] == r["mode"])], r)
                                for _, r in best.iterrows()])
    return best.reset_index(drop=True)


def _ordered(values: Iterable[str], preferred: list[str]) -> list[str]:
    values = list(dict.fromkeys(values))
    return [v for v in preferred if v in values] + sorted(v for v in values if v not in preferred)


def table1(results: pd.DataFrame) -> tuple[list[str], list[tuple[str, str]], dict]:
    """``(models, columns [(task, mode)], cells {(model, task, mode): (metric, hparams, is_best)})``."""
    best = best_per_cell(results)
    models = list(dict.fromkeys(best["model"]))
    tasks = _ordered(best["task"], TASK_ORDER)
    columns = [(task, mode) for task in tasks
               for mode in _ordered(best.loc[best.task == task, "mode"], list(METHODS))]
    cells = {}
    for (model, task), group in best.groupby(["model", "task"], sort=False):
        top = group["metric"].max()
        for _, row in group.iterrows():
            cells[(model, task, row["mode"])] = (row["metric"], row["hparams"], row["metric"] == top)
    return models, columns, cells


def _method(mode: str) -> str:
    return METHODS.get(mode, mode)


def _formatted_cells(model: str, columns, cells, digits: int, missing: str, bold, annotate) -> list[str]:
    """One Table-1 row's cells: the value (``bold`` when best), annotated with its hyperparameters."""
    row = []
    for task, mode in columns:
        if (model, task, mode) not in cells:
            row.append(missing)
            continue
        value, hparams, is_best = cells[(model, task, mode)]
        text = f"{value:.{digits}f}"
        text = bold(text) if is_best else text
        row.append(annotate(text, hparams) if hparams else text)
    return row


def table1_markdown(results: pd.DataFrame, digits: int = 2) -> str:
    """Table 1 as a Markdown table (headers ``task / method``; hyperparameters under each value)."""
    models, columns, cells = table1(results)
    header = ["model"] + [f"{task} / {_method(mode)}" for task, mode in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in models:
        row = [model] + _formatted_cells(model, columns, cells, digits, missing="–",
                                         bold=lambda text: f"**{text}**",
                                         annotate=lambda text, hparams: f"{text}<br>({hparams})")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters in plain text (one pass, so replacements are not re-escaped)."""
    return "".join(_LATEX_SPECIAL.get(char, char) for char in text)


def table1_latex(results: pd.DataFrame, digits: int = 2) -> str:
    """Table 1 as a booktabs ``tabular`` with one multicolumn header per task."""
    models, columns, cells = table1(results)
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
    frame = frame.sort_values(["_task", "task", "model", "_mode", "mode", "metric"],
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
