"""The optimizer of each mode: fused AdamW (fft, lora, strategies) or MoLFAdamW (molf, molf_e)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from molf.train.config import MOLF_MODES


def _adamw(groups: list[dict[str, Any]], cfg: Any) -> torch.optim.Optimizer:
    params = [p for g in groups for p in g["params"]]
    # The fused kernel needs every parameter on one supported device type and a floating dtype.
    fused = bool(params) and all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, fused=fused)


def decay_groups(params: list[nn.Parameter], lr: float, weight_decay: float, kind: str) -> list[dict[str, Any]]:
    """Two AdamW groups of one kind: matrices with ``weight_decay``, vectors (biases, norms) without."""
    matrices = [p for p in params if p.ndim >= 2]
    vectors = [p for p in params if p.ndim < 2]
    groups = [{"params": matrices, "lr": lr, "weight_decay": weight_decay, "kind": kind},
              {"params": vectors, "lr": lr, "weight_decay": 0.0, "kind": kind}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: Any, strategy_runtime: Optional[Any] = None) -> torch.optim.Optimizer:
    """The optimizer of ``cfg.mode`` over the currently trainable parameters of ``model``.

    fft: AdamW at ``learning_rate``/``weight_decay``; lora: AdamW at the LoRA lr/wd; molf and
    molf_e: ``MoLFAdamW`` over ``build_param_groups``; strategy modes: AdamW with one kind per
    ``StrategyRuntime.param_groups()`` entry, ``base_ffn`` at the FFT lr/wd and what the strategy
    adds (``lora``, ``attn_lora``, ``router``) at the LoRA lr/wd.

    Raises:
        ValueError: if nothing is trainable, or a strategy mode comes without its runtime.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"mode {cfg.mode}: the model has no trainable parameter; check the freezing flags")
    if cfg.mode in MOLF_MODES:
        return _molf_adamw(model, cfg)
    if cfg.mode == "fft":
        return _adamw(decay_groups(params, cfg.learning_rate, cfg.weight_decay, "fft"), cfg)
    if cfg.mode == "lora":
        return _adamw(decay_groups(params, cfg.lora_learning_rate, cfg.lora_weight_decay, "lora"), cfg)
    if strategy_runtime is None:
        raise ValueError(f"mode {cfg.mode} needs its StrategyRuntime (molf.model.strategies.apply_strategy)")
    groups = []
    for kind, kind_params in strategy_runtime.param_groups().items():
        base = kind == "base_ffn"
        lr = cfg.learning_rate if base else cfg.lora_learning_rate
        groups += decay_groups(kind_params, lr, cfg.weight_decay if base else cfg.lora_weight_decay, kind)
    return _adamw(groups, cfg)


def _molf_adamw(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    from molf.optim.molf_adamw import MoLFAdamW

    return MoLFAdamW.from_config(model, cfg)
