"""Optimizer hyper-parameters (flat flags, composed into ``molf.config.TrainingConfig``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

ScoreName = Literal["true_projected", "projected"]
ScoreBackend = Literal["auto", "eager", "compile", "triton", "native"]


@dataclass
class OptimConfig:
    """Learning rates and weight decays per expert kind, Adam constants and the routing rule."""

    # FFT expert (and every non-expert trainable parameter; all parameters in fft mode).
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    # LoRA experts (and the LoRA adapters of lora / strategy modes).
    lora_learning_rate: float = 5e-5
    lora_weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    # Routing: EPD (true_projected, Eq. 10) or PFN (projected, Eq. 11); top-K experts per module.
    molf_score_fn: ScoreName = "true_projected"
    molf_topk: int = 1
    # How MoLFAdamW's fused path computes the scores: auto (native on CPU when a C compiler builds
    # its kernels, else eager), native (CPU fp32: C kernels, moments + scores + increment in one pass),
    # eager, compile (torch.compile, compiles on the first step), triton (CUDA; validated in Triton's
    # interpreter only).
    molf_score_backend: ScoreBackend = "auto"

    def __post_init__(self) -> None:
        for name in ("learning_rate", "lora_learning_rate", "weight_decay", "lora_weight_decay", "adam_epsilon"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ValueError(f"max_grad_norm must be a finite number >= 0 (0 turns gradient clipping off), "
                             f"got {self.max_grad_norm}")
        if self.adam_epsilon == 0:
            raise ValueError("adam_epsilon must be > 0: with 0, an element whose gradient is zero divides 0 by 0")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.molf_topk < 1:
            raise ValueError(f"molf_topk must be >= 1 (experts updated per module per step), got {self.molf_topk}")
