"""Task dispatch: raw rows -> task examples -> tokenized training set."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from datasets import Dataset

from molf.data import fact, med, sql
from molf.data.io import load_rows, resolve_split_file, seeded_subset
from molf.data.overlap import drop_overlap, find_overlap
from molf.data.encoding import encode_example

logger = logging.getLogger(__name__)

TASK_MODULES = {"sql": sql, "med": med, "fact": fact}


def task_module(task: str):
    if task not in TASK_MODULES:
        raise ValueError(f"unknown dataset_type {task!r}; choose one of {sorted(TASK_MODULES)}")
    return TASK_MODULES[task]


def _data_file(path: Optional[str], split: str) -> Optional[Path]:
    return None if path is None else resolve_split_file(Path(path), split)


def _eval_location(cfg: Any) -> Optional[tuple[Optional[str], str]]:
    """``eval_source``'s answer, or None where there is nothing to score on (a local training file
    and no ``eval_data_path``)."""
    if cfg.eval_data_path is not None or cfg.data_path is None:
        return cfg.eval_data_path, "eval"
    if cfg.dataset_type == "fact":
        return cfg.data_path, "train"
    if Path(cfg.data_path).is_dir():
        return cfg.data_path, "eval"
    return None


def eval_source(cfg: Any) -> tuple[Optional[str], str]:
    """Where the eval examples come from: ``(path, split of that path)``; path None means the hub.

    ``cfg.eval_data_path`` when given. Otherwise ``fact`` scores the training rewrites
    (``cfg.data_path``, train split); ``med``/``sql`` read the eval file of a ``cfg.data_path``
    directory (``validation.jsonl``, ...), or the hub's eval split when training data is from the hub too.

    Raises:
        ValueError: ``cfg.data_path`` is a local file and no ``eval_data_path`` says what to score on.
    """
    location = _eval_location(cfg)
    if location is None:
        raise ValueError(f"--data_path {cfg.data_path} is a local file but there is no --eval_data_path: pass the "
                         "evaluation file with --eval_data_path (or --do_eval False); the hub's eval split is never "
                         "used silently for a run trained on local data")
    return location


def load_examples(cfg: Any, split: str) -> list:
    """Parse the ``split`` ("train" or "eval") examples of ``cfg.dataset_type`` (eval: see ``eval_source``)."""
    module = task_module(cfg.dataset_type)
    path, split = (cfg.data_path, "train") if split == "train" else eval_source(cfg)
    hub_split = module.HUB_TRAIN_SPLIT if split == "train" else module.HUB_EVAL_SPLIT
    rows = load_rows(path, split, module.HUB_ID, hub_split)
    if module is med:
        return med.parse_rows(rows, getattr(cfg, "med_answer_index_base", 0))
    if module is sql:
        paths = sql.spider_paths(_data_file(path, split), getattr(cfg, "spider_tables_path", None),
                                 getattr(cfg, "spider_databases_dir", None))
        return sql.parse_rows(rows, paths)
    return fact.parse_rows(rows)


def _without_eval_overlap(cfg: Any, examples: list) -> list:
    """Report (and with ``drop_eval_overlap``, drop) training questions that are also eval questions."""
    location = _eval_location(cfg)
    if cfg.dataset_type == "fact" or location is None or location[0] is None:  # no eval set, or the hub's
        return examples
    evaluation = load_examples(cfg, "eval")
    if getattr(cfg, "drop_eval_overlap", False):
        examples, report = drop_overlap(examples, evaluation)
        if report.shared_questions:
            logger.warning("%s; dropped them from training", report.summary())
        return examples
    report = find_overlap(examples, evaluation)
    if report.shared_questions:
        logger.warning("%s; pass --drop_eval_overlap True to drop them", report.summary())
    return examples


def build_train_dataset(cfg: Any, tokenizer, seed: int) -> Dataset:
    """Tokenized SFT training set of ``cfg.dataset_type``.

    Args:
        cfg: any object with the ``DataConfig`` fields.
        tokenizer: a Hugging Face tokenizer; the prompt/target encoding is the evaluator's.
        seed: seeds the ``num_train_samples`` subsample.

    Returns:
        A ``datasets.Dataset`` with ``input_ids``, ``attention_mask`` and ``labels`` (-100 on the prompt).

    Raises:
        ValueError: a malformed record (the message names file, line and field), or no row fits
            ``max_seq_length``.
    """
    examples = _without_eval_overlap(cfg, load_examples(cfg, "train"))
    examples = [examples[i] for i in seeded_subset(len(examples), cfg.num_train_samples, seed)]
    columns: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    dropped, cuts = 0, []
    for example in examples:
        encoded = encode_example(tokenizer, example.prompt, example.target, cfg.max_seq_length)
        if encoded is None:
            dropped += 1
            continue
        cut = encoded.pop("prompt_tokens_cut")
        if cut:
            cuts.append(cut)
        for key, values in encoded.items():
            columns[key].append(values)
    if dropped:
        logger.warning("dropped %d of %d training rows whose target alone exceeds max_seq_length=%s",
                       dropped, len(examples), cfg.max_seq_length)
    if cuts:
        logger.warning("cut the prompts of %d of %d training rows from the left to fit max_seq_length=%s (by %d "
                       "tokens at most, the start of the question is lost); raise --max_seq_length to keep them "
                       "whole", len(cuts), len(examples), cfg.max_seq_length, max(cuts))
    if not columns["input_ids"] and dropped:
        raise ValueError(f"no training row fits max_seq_length={cfg.max_seq_length}; raise it or omit it")
    if not columns["input_ids"]:
        raise ValueError("no training rows are left (every row was dropped as an eval-set overlap); pass "
                         "--drop_eval_overlap False or other training data")
    return Dataset.from_dict(columns)
