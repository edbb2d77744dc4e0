"""Evaluation flags (flat, composed into ``molf.config.TrainingConfig``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class EvalConfig:
    """How the evaluator of the task runs after training (rank 0) and where its row goes."""

    do_eval: bool = True
    num_eval_samples: Optional[int] = None
    eval_batch_size: int = 16
    max_new_tokens: int = 256
    # One CSV per task (sql.csv, med.csv, fact.csv) is appended to in this directory.
    results_dir: str = "results"
    # Wall-clock limit of each SQL query (gold and predicted) during execution accuracy.
    sql_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.num_eval_samples is not None and self.num_eval_samples <= 0:
            raise ValueError(f"num_eval_samples must be positive (or omitted), got {self.num_eval_samples}")
        if self.eval_batch_size <= 0:
            raise ValueError(f"eval_batch_size must be positive, got {self.eval_batch_size}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.sql_timeout_s <= 0:
            raise ValueError(f"sql_timeout_s must be positive, got {self.sql_timeout_s}")
