"""Shared pieces of the trainer tests: a deterministic token dataset, configs, one call to train."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from datasets import Dataset

from molf.config import TrainingConfig
from molf.data import SFTCollator
from molf.train.build import apply_mode, build_trainer

VOCAB = 128  # conftest.SMALL's vocabulary


def token_dataset(num_rows: int = 16, length: int = 12, prompt: int = 4, seed: int = 0) -> Dataset:
    """Rows of equal length (no padding: the tokenizer's pad id lies outside the tiny vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_rows):
        ids = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * prompt + ids[prompt:]})
    return Dataset.from_list(rows)


def make_cfg(root: Path, mode: str = "molf", **overrides) -> TrainingConfig:
    fields = dict(model_name_or_path="tiny-qwen2", mode=mode, max_steps=6, per_device_batch_size=4,
                  gradient_accumulation_steps=1, learning_rate=3e-3, lora_learning_rate=3e-3, warm_up_ratio=0.0,
                  lr_scheduler_type="constant", logging_steps=2, save_strategy="no", report_to="none",
                  ckpt_dir_root=str(root), lora_dropout=0.0, seed=0)
    if mode in ("molf", "molf_e"):
        fields["molf_lora_ranks"] = [4, 8] if mode == "molf_e" else [4]
    if mode == "lora":
        fields["lora_rank"] = 4
    fields.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TrainingConfig(**fields)


def train(cfg: TrainingConfig, model, tokenizer, dataset=None, resume=None, callbacks=(), start=True):
    """Apply the mode to ``model``, train it (unless ``start`` is False), return the trainer."""
    trainer = build_trainer(cfg, apply_mode(model, cfg), tokenizer, dataset or token_dataset(),
                            SFTCollator(tokenizer), callbacks=callbacks)
    if start:
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
