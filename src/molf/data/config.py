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
    # Drop training rows whose question is also in the eval set (the overlap is always reported).
    drop_eval_overlap: bool = False
    # MedMCQA answer index: 0 for the Hugging Face layout (cop 0..3), 1 for the original GitHub JSON (1..4).
    med_answer_index_base: int = 0
    # Spider rows: schema file and database directory (default: next to the data file).
    spider_tables_path: Optional[str] = None
    spider_databases_dir: Optional[str] = None

    def __post_init__(self) -> None:
        if self.num_train_samples is not None and self.num_train_samples <= 0:
            raise ValueError(f"num_train_samples must be positive (or omitted), got {self.num_train_samples}")
        if self.max_seq_length is not None and self.max_seq_length <= 1:
            raise ValueError(f"max_seq_length must be > 1 (or omitted), got {self.max_seq_length}")
        if self.med_answer_index_base not in (0, 1):
            raise ValueError(f"med_answer_index_base must be 0 (HF layout) or 1 (original layout), "
                             f"got {self.med_answer_index_base}")
