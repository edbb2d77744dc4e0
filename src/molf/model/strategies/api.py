"""The strategy entry points used by the trainer: validate a config, apply a strategy."""

from __future__ import annotations

import logging
from typing import Optional

from torch import nn

from molf.model.strategies.config import StrategyConfig, StrategyLoRAConfig
from molf.model.strategies.runtime import StrategyRuntime
from molf.model.strategies.structure import check_mode, inject_strategy
from molf.train.handoff import handoff_rules, parse_handoff
from molf.train.phases import ROUTED_MODES, parse_phases, phase_warnings

logger = logging.getLogger(__name__)


def validate_strategy(cfg: StrategyConfig, mode: str, total_steps: Optional[int] = None) -> list[str]:
    """Check the strategy fields of ``cfg`` for ``mode`` without touching a model.

    Args:
        cfg: a config with ``StrategyConfig`` fields.
        mode: ``dense_lora``, ``mixture_lora`` or ``moe_expert_lora``.
        total_steps: optimizer steps of the run, when known (enables the step-range rules).

    Returns:
        Warnings (legal but suspicious settings), one sentence each.

    Raises:
        ValueError: for every rule of DESIGN section 6 (phases, handoff, top-k), with the fix.
    """
    check_mode(mode)
    if mode in ROUTED_MODES and cfg.expert_top_k > cfg.num_experts:
        raise ValueError(f"expert_top_k={cfg.expert_top_k} > num_experts={cfg.num_experts}: lower expert_top_k")
    phases = parse_phases(cfg.phases, mode, cfg.attn_lora)
    warnings = phase_warnings(phases, mode, total_steps) + _ignored_knobs(cfg, mode)
    if cfg.handoff is not None:
        warnings += handoff_rules(parse_handoff(cfg.handoff), mode, phases, cfg.attn_lora, total_steps)
    return warnings


ROUTER_KNOBS = ("num_experts", "expert_top_k", "router_z_loss_coef", "router_aux_loss_coef")


def _ignored_knobs(cfg, mode: str) -> list[str]:
    """Warnings for strategy knobs set away from their default in a mode that ignores them."""
    defaults = StrategyConfig()
    ignored = list(ROUTER_KNOBS) if mode not in ROUTED_MODES else []
    ignored += [] if cfg.attn_lora else ["attn_targets"]
    changed = [name for name in ignored if getattr(cfg, name) != getattr(defaults, name)]
    return [f"{name} is ignored in {mode}" + ("" if name in ROUTER_KNOBS else " without attn_lora: true")
            for name in changed]


def apply_strategy(model: nn.Module, cfg, mode: str) -> StrategyRuntime:
    """Inject the strategy into ``model`` and make only the first phase's groups trainable.

    Args:
        model: a transformers causal LM.
        cfg: a config with ``StrategyConfig`` and ``LoRAConfig`` fields (``TrainingConfig`` or
            ``StrategyLoRAConfig``).
        mode: the strategy mode.

    Returns:
        The runtime that applies phases and handoff during training.

    Raises:
        ValueError: a bad config (see ``validate_strategy``) or targets missing from the model.
    """
    validate_strategy(cfg, mode)
    inject_strategy(model, cfg, mode)
    runtime = StrategyRuntime(model, cfg, mode)
    logger.info("%s", runtime.summary())
    return runtime
