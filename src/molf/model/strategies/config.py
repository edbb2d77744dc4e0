"""Config of the LoRA-strategy variants (DESIGN section 6): dense, mixture-of-LoRA, MoE-expert LoRA."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from molf.model.config import LoRAConfig


@dataclass
class StrategyConfig:
    """Injection scope, experts, router losses, phases and the LoRA handoff.

    Only read in the modes ``dense_lora``, ``mixture_lora`` and ``moe_expert_lora``.
    """

    ffn_targets: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    attn_lora: bool = False
    attn_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # Injection scope: blocks [start_layer, start_layer + num_layers); num_layers 0 = all.
    start_layer: int = 0
    num_layers: int = 0
    # mixture_lora: LoRA experts per linear; moe_expert_lora: FFN copies per block.
    num_experts: int = 4
    expert_top_k: int = 2
    router_z_loss_coef: float = 1e-3
    router_aux_loss_coef: float = 1e-2
    # [{step: 0, trainable: [router, lora]}, {step: 100, trainable: [lora, base_ffn]}]; None: one phase
    # training what the strategy adds.
    phases: Optional[list[dict[str, Any]]] = None
    # moe_expert_lora only: {fade: {...}, lr_ramp: {...}, export: {...}}; see molf.train.handoff.
    # Checked (with phases) by molf.model.strategies.validate_strategy, which needs the mode.
    handoff: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        if self.start_layer < 0 or self.num_layers < 0:
            raise ValueError("start_layer and num_layers must be >= 0 (num_layers 0 means every layer)")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.expert_top_k <= self.num_experts:
            raise ValueError(f"expert_top_k must be in [1, num_experts={self.num_experts}], got {self.expert_top_k}")


@dataclass
class StrategyLoRAConfig(StrategyConfig, LoRAConfig):
    """The strategy fields plus the LoRA fields they read, for using the strategies without the trainer."""

    def __post_init__(self) -> None:
        LoRAConfig.__post_init__(self)
        StrategyConfig.__post_init__(self)
