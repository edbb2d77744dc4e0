"""Data flags (flat, composed into ``molf.config.TrainingConfig``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

DatasetType = Literal["sql", "med", "fact"]


@dataclass
class DataConfig:
    """Which benchmark, from where, and how much of it."""

    dataset_type: DatasetType = "med"
    # Local file (JSONL/JSON/parquet/CSV) or directory; None loads the paper's hub dataset.
    data_path: Optional[str] = None
    eval_data_path: Optional[str] = None
    # Seeded subsample of the training set (None: all of it).
    num_train_samples: Optional[int] = None
    # Truncate prompt+target to this many tokens, never silently cutting the target away.
    max_seq_length: Optional[int] = None

    def __post_init__(self) -> None:
        if self.num_train_samples is not None and self.num_train_samples <= 0:
            raise ValueError(f"num_train_samples must be positive (or omitted), got {self.num_train_samples}")
        if self.max_seq_length is not None and self.max_seq_length <= 1:
            raise ValueError(f"max_seq_length must be > 1 (or omitted), got {self.max_seq_length}")
