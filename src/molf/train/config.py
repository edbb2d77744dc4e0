"""Training-loop flags (flat, composed into ``molf.config.TrainingConfig``).

Field names are the reference's command-line flags (DESIGN section 3) plus this codebase's own
(``precision``, ``attn_implementation``, ``routing_log_every``, ...). Only field-local checks live
here; rules that involve other components are in ``molf.config.TrainingConfig.__post_init__``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

Mode = Literal["fft", "lora", "molf", "molf_e", "dense_lora", "mixture_lora", "moe_expert_lora"]
MOLF_MODES = ("molf", "molf_e")
STRATEGY_MODES = ("dense_lora", "mixture_lora", "moe_expert_lora")
Precision = Literal["auto", "fp32", "bf16_mixed", "bf16_pure"]
ReportTo = Literal["none", "json", "tensorboard", "wandb"]
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]
SAVE_STRATEGIES = ("no", "steps", "epoch")

# transformers.SchedulerType values that run without evaluation metrics or extra scheduler kwargs.
SUPPORTED_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
)
# --resume_from_checkpoint value that picks the newest checkpoint-* of the run directory (if any).
RESUME_AUTO = "auto"


@dataclass
class TrainConfig:
    """Model, mode, schedule, batch, outputs, precision and the training-loop switches."""

    # Hub id, local directory, or tiny-<family>[:key=value,...] (a small model built from a config).
    model_name_or_path: str = "Qwen/Qwen2.5-1.5B"
    # None: the model's own tokenizer (the vendored Qwen2.5 tokenizer for tiny-* models).
    tokenizer_name_or_path: Optional[str] = None
    mode: Mode = "molf"
    num_train_epochs: float = 2.0
    # > 0 overrides num_train_epochs with a fixed number of optimizer steps.
    max_steps: int = -1
    lr_scheduler_type: str = "cosine"
    warm_up_ratio: float = 0.1
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 4
    # Seeds Python, NumPy, torch, the Trainer, model init of tiny models and the data order.
    seed: int = 42
    # Checkpoints, the merged model and run logs go to <ckpt_dir_root>/<run_name>/.
    ckpt_dir_root: str = "ckpts"
    # TensorBoard / wandb files go to <log_dir_root>/<run_name>/.
    log_dir_root: str = "logs"
    logging_steps: int = 10
    # json: metrics appended to <run_dir>/metrics.jsonl.
    report_to: ReportTo = "json"
    # One of no, steps, epoch (a str, not a Literal: draccus reads a bare `no` as YAML false).
    save_strategy: str = "epoch"
    save_steps: int = 500
    save_total_limit: Optional[int] = 2
    # Delete the intermediate checkpoint-* directories once the merged model is saved.
    clean_ckpt_at_end: bool = True
    # Skip training and evaluate <run_dir>/final.
    only_eval: bool = False
    # auto: bf16 autocast with fp32 master weights on a bf16 GPU, fp32 elsewhere;
    # bf16_pure: weights and optimizer states in bf16 (the paper's setting).
    precision: Precision = "auto"
    attn_implementation: AttnImplementation = "sdpa"
    gradient_checkpointing: bool = False
    # Write molf_routing.jsonl every this many optimizer steps (0: no routing log).
    routing_log_every: int = 1
    # Check the config and exit without loading anything.
    validate_only: bool = False
    # Load the model, apply the mode's injection, print parameter counts and exit.
    preflight: bool = False
    # A checkpoint directory, or "auto" for the newest checkpoint-* of the run directory.
    resume_from_checkpoint: Optional[str] = None
    # Start over in a run directory that already holds this run (its checkpoints, final model and
    # logs are deleted first); without it such a directory is an error unless the run is resumed.
    overwrite_run_dir: bool = False
    dataloader_num_workers: int = 0

    def __post_init__(self) -> None:
        if self.max_steps <= 0:
            self.max_steps = -1  # 0 and every negative value mean "train for num_train_epochs": one run name
        if not self.model_name_or_path:
            raise ValueError("model_name_or_path is empty: give a hub id, a local directory or tiny-qwen2")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32) (NumPy's seed range), got {self.seed}")
        if not (math.isfinite(self.num_train_epochs) and self.num_train_epochs > 0):
            raise ValueError(f"num_train_epochs must be > 0, got {self.num_train_epochs}")
        if not 0.0 <= self.warm_up_ratio < 1.0:
            raise ValueError(f"warm_up_ratio must be in [0, 1), got {self.warm_up_ratio}")
        for name in ("per_device_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1 (or omitted to keep all), got {self.save_total_limit}")
        if self.overwrite_run_dir and self.resume_from_checkpoint:
            raise ValueError("--overwrite_run_dir starts the run over: "
                             "drop --resume_from_checkpoint (or the overwrite)")
        if self.routing_log_every < 0:
            raise ValueError(f"routing_log_every must be >= 0 (0 disables the routing log), "
                             f"got {self.routing_log_every}")
        if self.dataloader_num_workers < 0:
            raise ValueError(f"dataloader_num_workers must be >= 0, got {self.dataloader_num_workers}")
        self._check_scheduler()
        if self.save_strategy in ("False", "false"):
            self.save_strategy = "no"
        if self.save_strategy not in SAVE_STRATEGIES:
            raise ValueError(f"save_strategy must be one of {list(SAVE_STRATEGIES)}, got {self.save_strategy!r}")

    def _check_scheduler(self) -> None:
        from transformers import SchedulerType

        known = {s.value for s in SchedulerType}
        if self.lr_scheduler_type not in known or self.lr_scheduler_type not in SUPPORTED_SCHEDULERS:
            raise ValueError(
                f"lr_scheduler_type {self.lr_scheduler_type!r} is not supported; "
                f"choose one of {list(SUPPORTED_SCHEDULERS)}"
            )
