"""molf.data: benchmark loaders (sql, med, fact), shared tokenization and the SFT collator."""

from molf.data.builder import build_train_dataset, load_examples
from molf.data.config import DataConfig
from molf.data.encoding import SFTCollator, encode_example, encode_prompt

__all__ = ["DataConfig", "SFTCollator", "build_train_dataset", "encode_example", "encode_prompt", "load_examples"]
