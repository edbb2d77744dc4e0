"""Configs of the adapters: shared LoRA knobs and the MoLF expert layout.

Field names are the command-line flags (DESIGN section 3); ``molf.config.TrainingConfig`` composes
these dataclasses flat, so ``--molf_lora_ranks "[32,128]"`` sets ``MoLFConfig.molf_lora_ranks``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

# The reference's ``lora_alpha`` default, which its MoLF mode gives every LoRA expert.
MOLF_DEFAULT_ALPHA = 32.0


@dataclass
class LoRAConfig:
    """LoRA hyper-parameters shared by ``lora`` (peft), MoLF's LoRA experts and the strategy variants."""

    lora_rank: int = 32
    # None: for peft LoRA and the strategy adapters, derived per rank from ``lora_effective_scale``
    # (alpha = round(scale*sqrt(r)) with rsLoRA, scale*r without), so every rank gets the same
    # effective scaling; for MoLF's LoRA experts, 32 for every expert, as the reference does.
    lora_alpha: Optional[float] = None
    lora_effective_scale: float = 2.0
    lora_dropout: float = 0.05
    use_rslora: bool = True

    def __post_init__(self) -> None:
        if self.lora_rank <= 0:
            raise ValueError(f"lora_rank must be a positive integer, got {self.lora_rank}")
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"lora_alpha must be a positive finite number (or omitted), got {self.lora_alpha}")
        if not (math.isfinite(self.lora_effective_scale) and self.lora_effective_scale > 0):
            raise ValueError(f"lora_effective_scale must be positive, got {self.lora_effective_scale}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")

    def molf_expert_alpha(self) -> float:
        """``lora_alpha`` of every MoLF LoRA expert: the given value, else the reference's default of 32
        (its MoLF mode gives every expert ``lora_alpha``; the effective-scale heuristic is LoRA-mode only)."""
        return float(self.lora_alpha) if self.lora_alpha is not None else MOLF_DEFAULT_ALPHA

    def alpha_for_rank(self, r: int) -> float:
        """``lora_alpha`` if given, else the reference heuristic that keeps the effective scale fixed."""
        if self.lora_alpha is not None:
            return float(self.lora_alpha)
        if self.use_rslora:
            return float(round(self.lora_effective_scale * math.sqrt(r)))
        return float(self.lora_effective_scale * r)


@dataclass
class MoLFConfig:
    """Which linears become ``MoLFLinear`` and which experts each one has."""

    # Ranks of the LoRA experts of every wrapped module, e.g. [128] (MoLF) or [32, 128] (MoLF-E).
    molf_lora_ranks: list[int] = field(default_factory=lambda: [128])
    # False: no FFT expert, base weights frozen (MoLF-E; same as --mode molf_e).
    molf_fft: bool = True
    # Also freeze every parameter outside the wrapped linears (embeddings, norms).
    molf_freeze_non_linear: bool = False
    # Module-name suffixes to wrap (e.g. [q_proj, v_proj]); None wraps every nn.Linear.
    molf_target_modules: Optional[list[str]] = None
    molf_exclude_modules: list[str] = field(default_factory=lambda: ["lm_head"])

    def __post_init__(self) -> None:
        if not self.molf_lora_ranks:
            raise ValueError("molf_lora_ranks must name at least one rank, e.g. --molf_lora_ranks \"[128]\"")
        bad = [r for r in self.molf_lora_ranks if int(r) != r or r <= 0]
        if bad:
            raise ValueError(f"molf_lora_ranks must be positive integers, got {self.molf_lora_ranks}")
        if self.molf_target_modules is not None and not self.molf_target_modules:
            raise ValueError("molf_target_modules is empty: omit it to wrap every linear, or list module suffixes")

    @property
    def molf_num_experts(self) -> int:
        return len(self.molf_lora_ranks) + (1 if self.molf_fft else 0)

    def molf_expert_names(self) -> list[str]:
        """Expert names in routing order: ``fft`` first when present, then ``lora{i}_r{rank}``."""
        names = ["fft"] if self.molf_fft else []
        return names + [f"lora{i}_r{r}" for i, r in enumerate(self.molf_lora_ranks)]
