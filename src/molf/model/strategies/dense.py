"""``dense_lora``: one LoRA per target linear of the FFN (and optionally of attention) in a block range."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn

from molf.model.strategies.blocks import Block, find_blocks, fused_expert_modules, select_blocks, target_linears
from molf.model.strategies.fused_lora import inject_fused_expert_lora
from molf.model.strategies.lora_linear import LoRALinear, Role, replace_module


@dataclass(frozen=True)
class LoRASettings:
    """The LoRA knobs a strategy reads from ``LoRAConfig`` (one rank for every adapter)."""

    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool


def lora_settings(cfg) -> LoRASettings:
    """Read ``lora_rank``, ``alpha_for_rank``, ``lora_dropout``, ``use_rslora`` from a composed config.

    Raises:
        ValueError: if ``cfg`` has no LoRA fields (pass a ``TrainingConfig`` or ``StrategyLoRAConfig``).
    """
    if not hasattr(cfg, "alpha_for_rank"):
        raise ValueError(f"{type(cfg).__name__} has no LoRA fields: pass molf.config.TrainingConfig or "
                         "molf.model.strategies.StrategyLoRAConfig, which carry lora_rank/lora_alpha/...")
    return LoRASettings(cfg.lora_rank, cfg.alpha_for_rank(cfg.lora_rank), cfg.lora_dropout, cfg.use_rslora)


def scoped_blocks(model: nn.Module, cfg) -> list[Block]:
    """The blocks the strategy touches: ``[start_layer, start_layer + num_layers)`` (0 = all)."""
    return select_blocks(find_blocks(model), cfg.start_layer, cfg.num_layers)


def wrap_linears(module: nn.Module, targets: list[str], lora: LoRASettings, role: Role,
                 b_init_std: float = 0.0) -> int:
    """Replace each target ``nn.Linear`` under ``module`` by a ``LoRALinear``; return how many."""
    found = target_linears(module, targets)
    for name, linear in found:
        replace_module(module, name, LoRALinear(linear, lora.r, lora.lora_alpha, lora.lora_dropout,
                                                lora.use_rslora, role=role, b_init_std=b_init_std))
    return len(found)


def _missing_targets_error(block: Block, part: str, module: nn.Module, targets: list[str]) -> ValueError:
    linears = sorted({n.rpartition(".")[2] for n, m in module.named_modules() if isinstance(m, nn.Linear)})
    return ValueError(f"no {part} targets {targets} in {block.name}; its linears are {linears}: "
                      f"set {'ffn_targets' if part == 'FFN' else 'attn_targets'} to some of them")


def inject_attn_lora(blocks: list[Block], cfg) -> int:
    """LoRA on ``attn_targets`` of each block's attention (when ``attn_lora``); return the count.

    Raises:
        ValueError: if a block has none of the attention targets.
    """
    if not cfg.attn_lora:
        return 0
    lora, count = lora_settings(cfg), 0
    for block in blocks:
        wrapped = wrap_linears(block.attn, cfg.attn_targets, lora, role="attn")
        if wrapped == 0:
            raise _missing_targets_error(block, "attention", block.attn, cfg.attn_targets)
        count += wrapped
    return count


def inject_dense_lora(model: nn.Module, cfg) -> int:
    """Wrap FFN (and optional attention) target linears of the scoped blocks with ``LoRALinear``.

    Mixtral-style experts stored as 3-D tensors get a per-expert LoRA parametrization instead
    (``fused_lora``), which cannot apply ``lora_dropout`` to the input (a warning says so).

    Args:
        model: a transformers causal LM.
        cfg: a config with ``StrategyConfig`` and ``LoRAConfig`` fields.

    Returns:
        The number of adapters injected.

    Raises:
        ValueError: if a scoped block has none of the FFN targets.
    """
    blocks = scoped_blocks(model, cfg)
    lora, count = lora_settings(cfg), 0
    for block in blocks:
        wrapped = wrap_linears(block.mlp, cfg.ffn_targets, lora, role="ffn")
        if wrapped == 0:
            wrapped = _inject_fused(block, cfg.ffn_targets, lora)
        if wrapped == 0:
            raise _missing_targets_error(block, "FFN", block.mlp, cfg.ffn_targets)
        count += wrapped
    return count + inject_attn_lora(blocks, cfg)


def _inject_fused(block: Block, targets: list[str], lora: LoRASettings) -> int:
    count = 0
    for _, experts in fused_expert_modules(block.mlp):
        count += inject_fused_expert_lora(experts, targets, lora.r, lora.lora_alpha, lora.use_rslora)
    if count and lora.lora_dropout > 0:
        warnings.warn(f"lora_dropout={lora.lora_dropout} is ignored on the fused experts of {block.name} "
                      "(their LoRA is a weight delta, applied without input dropout)", stacklevel=3)
    return count
