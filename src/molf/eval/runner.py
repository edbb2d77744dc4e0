"""``evaluate_task``: run one task's evaluator, append its row to the task's CSV, return the metrics."""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping

from molf.data import load_examples
from molf.data.encoding import encode_prompt, encode_target, prompt_budget
from molf.data.io import seeded_subset
from molf.eval.fact import score_fact
from molf.eval.generation import generate_greedy
from molf.eval.med import score_med
from molf.eval.results import append_task_row, build_row, check_task_file
from molf.eval.sql import check_databases, extract_sql, score_sql

logger = logging.getLogger(__name__)

# The answer is one letter; a few tokens cover "Answer: (A)" without generating paragraphs.
MED_MAX_NEW_TOKENS = 8


def _eval_examples(cfg: Any, seed: int) -> list:
    examples = load_examples(cfg, "eval")
    if cfg.dataset_type == "fact" and cfg.eval_data_path is None:
        # Knowledge injection: score exactly the rewrites the training subsample taught.
        examples = [examples[i] for i in seeded_subset(len(examples), cfg.num_train_samples, seed)]
    return examples[:cfg.num_eval_samples] if cfg.num_eval_samples else examples


def _prompt_budget(tokenizer, example, max_seq_length, beside_target: bool) -> int | None:
    """Tokens left for the prompt: ``max_seq_length``, or with ``beside_target`` what training leaves it
    next to the example's target (Med: " X" + EOS), so that the eval prompt is exactly the training prompt."""
    if max_seq_length is None or not beside_target:
        return max_seq_length
    return max(prompt_budget(max_seq_length, encode_target(tokenizer, example.target)), 1)


def _generate(model, tokenizer, cfg: Any, examples: list, max_new_tokens: int,
              beside_target: bool = False) -> list[str]:
    prompts = [encode_prompt(tokenizer, example.prompt,
                             _prompt_budget(tokenizer, example, cfg.max_seq_length, beside_target))
               for example in examples]
    return generate_greedy(model, tokenizer, prompts, cfg.eval_batch_size, max_new_tokens,
                           desc=f"eval {cfg.dataset_type}")


def evaluate_sql(model, tokenizer, cfg: Any, seed: int = 0) -> tuple[dict[str, Any], int, dict]:
    examples = _eval_examples(cfg, seed)
    check_databases(examples)
    predictions = [extract_sql(text) for text in _generate(model, tokenizer, cfg, examples, cfg.max_new_tokens)]
    return score_sql(examples, predictions, getattr(cfg, "sql_timeout_s", 10.0)), len(examples), {}


def evaluate_medmcqa(model, tokenizer, cfg: Any, seed: int = 0) -> tuple[dict[str, Any], int, dict]:
    examples = _eval_examples(cfg, seed)
    generations = _generate(model, tokenizer, cfg, examples, min(cfg.max_new_tokens, MED_MAX_NEW_TOKENS),
                            beside_target=True)
    metrics, details = score_med(examples, generations)
    return metrics, len(examples), details


def evaluate_fact(model, tokenizer, cfg: Any, seed: int = 0) -> tuple[dict[str, Any], int, dict]:
    examples = _eval_examples(cfg, seed)
    return score_fact(model, tokenizer, examples, cfg.eval_batch_size, cfg.max_seq_length), len(examples), {}


EVALUATORS = {"sql": evaluate_sql, "med": evaluate_medmcqa, "fact": evaluate_fact}


def details_path(results_dir: str, task: str, run_name: str) -> Path:
    safe_name = re.sub(r"[^A-Za-z0-9._=+-]+", "_", str(run_name)) or "run"
    return Path(results_dir) / f"{task}_details" / f"{safe_name}.json"


def _keep_unappended_row(results_dir: str, task: str, row: dict[str, Any]) -> Path:
    """Write a row the CSV refused to a JSON file of its own, so the evaluation's result is not lost."""
    details = details_path(results_dir, task, row["run_name"])
    path = details.with_name(f"{details.stem}.unappended_row.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        path = Path.cwd() / path.name
    path.write_text(json.dumps(row, indent=2, default=str) + "\n")
    return path


def evaluate_task(task: str, model, tokenizer, cfg: Any, run_info: Mapping[str, Any]) -> dict[str, Any]:
    """Evaluate ``model`` on ``task``, append one row to ``<cfg.results_dir>/<task>.csv``, return the metrics.

    Args:
        task: "sql", "med" or "fact"; overrides ``cfg.dataset_type`` for loading the eval data.
        cfg: any object with the ``DataConfig`` and ``EvalConfig`` fields.
        run_info: the run columns of the results CSV (see ``molf.eval.results.RUN_COLUMNS``), without
            ``timestamp_utc``, ``num_eval_samples`` and ``num_eval``, which the evaluator fills in.

    Returns:
        The task's metrics (``TASK_METRICS[task]`` plus diagnostics such as ``gold_errors``).
    """
    if task not in EVALUATORS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(EVALUATORS)}")
    check_task_file(cfg.results_dir, task)
    task_cfg = copy.copy(cfg)
    task_cfg.dataset_type = task
    seed = int(run_info.get("seed") or 0)
    metrics, num_eval, details = EVALUATORS[task](model, tokenizer, task_cfg, seed)
    row = build_row(task, run_info, metrics, num_eval, cfg.num_eval_samples)
    try:
        csv_path = append_task_row(cfg.results_dir, task, row)
    except (OSError, ValueError) as error:
        kept = _keep_unappended_row(cfg.results_dir, task, row)
        raise type(error)(f"{error} (this evaluation's row was saved to {kept} instead)") from error
    logger.info("%s: %s (row appended to %s)", task, metrics, csv_path)
    if details:
        path = details_path(cfg.results_dir, task, run_info["run_name"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"run_name": run_info["run_name"], **details}, indent=2) + "\n")
    return metrics
