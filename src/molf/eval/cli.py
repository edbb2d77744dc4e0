"""Standalone evaluation of a saved checkpoint: ``python -m molf.eval --task med --model PATH``."""

from __future__ import annotations

import argparse
import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from molf._cli import report_error
from molf.data.config import DataConfig
from molf.eval.checkpoint import (
    check_checkpoint,
    find_resolved_config,
    load_model_and_tokenizer,
    load_training_config,
    run_info_for,
)
from molf.eval.config import EvalConfig
from molf.eval.runner import evaluate_task

# Errors that mean bad input (a flag value, a path, a record, a model that cannot be loaded), printed as
# one line by ``cli``.
USER_ERRORS = (ValueError, OSError)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# CLI flags copied onto the config when given (None means "keep the run's value or the default").
OVERRIDES = ("data_path", "eval_data_path", "num_train_samples", "max_seq_length", "med_answer_index_base",
             "spider_tables_path", "spider_databases_dir", "num_eval_samples", "eval_batch_size", "max_new_tokens",
             "results_dir", "sql_timeout_s")


@dataclass
class StandaloneEvalConfig(DataConfig, EvalConfig):
    """Data and evaluation flags for a checkpoint whose training config is unknown."""

    def __post_init__(self) -> None:
        DataConfig.__post_init__(self)
        EvalConfig.__post_init__(self)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m molf.eval", description=__doc__)
    parser.add_argument("--task", required=True, choices=["sql", "med", "fact"])
    parser.add_argument("--model", required=True,
                        help="checkpoint directory (full model or PEFT adapter) or tiny-<family>")
    parser.add_argument("--tokenizer",
                        help="tokenizer path (default: the checkpoint's; the vendored Qwen2.5 one for tiny-*)")
    parser.add_argument("--data_path", dest="eval_data_path", help="evaluation data file or directory")
    parser.add_argument("--train_data_path", dest="data_path", help="training data (fact: the rewrites to score)")
    parser.add_argument("--results_dir")
    parser.add_argument("--num_eval_samples", type=int)
    parser.add_argument("--num_train_samples", type=int)
    parser.add_argument("--eval_batch_size", type=int)
    parser.add_argument("--max_new_tokens", type=int)
    parser.add_argument("--max_seq_length", type=int)
    parser.add_argument("--med_answer_index_base", type=int, choices=[0, 1])
    parser.add_argument("--spider_tables_path")
    parser.add_argument("--spider_databases_dir")
    parser.add_argument("--sql_timeout_s", type=float)
    parser.add_argument("--run_name", help="override the run_name column")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace):
    """The evaluation's config: the run's TrainingConfig when its resolved_config.yaml is found, else
    defaults, with the CLI flags on top. Also returns the run's TrainingConfig as it was trained (the
    flags change what is evaluated, not the run's name and settings in the results row)."""
    resolved = None if args.model.startswith("tiny-") else find_resolved_config(Path(args.model))
    training_config = load_training_config(resolved) if resolved is not None else None
    cfg = copy.deepcopy(training_config) if training_config is not None else StandaloneEvalConfig()
    for name in OVERRIDES:
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    cfg.dataset_type = args.task
    # Re-check the flags the CLI may have changed (a TrainingConfig's other rules held when it was saved).
    DataConfig.__post_init__(cfg)
    EvalConfig.__post_init__(cfg)
    return cfg, training_config


def check_inputs(args: argparse.Namespace, cfg) -> None:
    """Fail before any model is loaded when the checkpoint directory, a tokenizer path or the evaluation
    data is not there, or the results CSV has a header its row cannot be appended under."""
    from molf.data.builder import eval_source
    from molf.data.io import resolve_split_file
    from molf.eval.results import check_task_file
    from molf.model.load import check_local_reference
    from molf.model.tiny import is_tiny_name

    if not is_tiny_name(args.model):
        check_checkpoint(args.model)
    check_local_reference("tokenizer", args.tokenizer)
    try:
        path, split = eval_source(cfg)
    except ValueError:  # its message names train.py's flags
        raise ValueError(f"--train_data_path {cfg.data_path} is a local file and no --data_path says what to "
                         f"evaluate {args.task} on: pass the evaluation file or directory with --data_path") from None
    if path is not None:
        resolve_split_file(Path(path), split)
    check_task_file(cfg.results_dir, args.task)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Evaluate, append the row, print and return the metrics; errors propagate (see ``cli``)."""
    args = parse_args(argv)
    return _evaluate(args, *build_config(args))


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """``main`` for the command line: a bad flag value, a missing checkpoint or data path or a results CSV
    with another header prints one ``error:`` line and exits 2 before anything is loaded; a malformed
    record (found while reading the data) exits 1.
    ``MOLF_TRACEBACK=1`` shows the traceback instead (as for ``src/script/train.py``)."""
    args = parse_args(argv)  # argparse exits 2 on an unknown flag or a bad choice
    try:
        cfg, training_config = build_config(args)
        check_inputs(args, cfg)
    except USER_ERRORS as err:
        return report_error(err, 2)
    try:
        _evaluate(args, cfg, training_config)
    except USER_ERRORS as err:
        return report_error(err, 1)
    return 0


def _evaluate(args: argparse.Namespace, cfg, training_config) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_info = run_info_for(args.model, args.task, training_config)
    if args.run_name:
        run_info["run_name"] = args.run_name
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, DTYPES[args.dtype], args.device)
    metrics = evaluate_task(args.task, model, tokenizer, cfg, run_info)
    print(json.dumps(metrics, indent=2))
    return metrics
