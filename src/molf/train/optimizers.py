"""The optimizer of each mode: fused AdamW (fft, lora, strategies) or MoLFAdamW (molf, molf_e)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from molf.train.config import MOLF_MODES


def _adamw(groups: list[dict[str, Any]], cfg: Any) -> torch.optim.Optimizer:
    params = [p for g in groups for p in g["params"]]
    # The fused kernel needs every parameter on one supported device type and a floating dtype.
    fused = bool(params) and all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, fused=fused)


def decay_groups(params: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float, kind: str) -> list[dict[str, Any]]:
    """Two AdamW groups of one kind: matrices with ``weight_decay``, vectors (biases, norms) without."""
    matrices = [p for _, p in params if p.ndim >= 2]
    vectors = [p for _, p in params if p.ndim < 2]
    groups = [{"params": matrices, "lr": lr, "weight_decay": weight_decay, "kind": kind},
              {"params": vectors, "lr": lr, "weight_decay": 0.0, "kind": kind}]
    return [g for g in groups if g["params"]]


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """The optimizer of ``cfg.mode`` over the currently trainable parameters of ``model``.

    fft: AdamW at ``learning_rate``/``weight_decay``; lora: AdamW at the LoRA lr/wd; molf and
    molf_e: ``MoLFAdamW`` over ``build_param_groups``.

    Raises:
        ValueError: if nothing is trainable.
    """
    params = trainable(model)
    if not params:
        raise ValueError(f"mode {cfg.mode}: the model has no trainable parameter; check the freezing flags")
    if cfg.mode in MOLF_MODES:
        return _molf_adamw(model, cfg)
    if cfg.mode == "fft":
        return _adamw(decay_groups(params, cfg.learning_rate, cfg.weight_decay, "fft"), cfg)
    if cfg.mode == "lora":
        return _adamw(decay_groups(params, cfg.lora_learning_rate, cfg.lora_weight_decay, "lora"), cfg)
    raise ValueError(f"mode {cfg.mode} has no optimizer here; use fft, lora, molf or molf_e")


def _molf_adamw(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    from molf.optim.molf_adamw import MoLFAdamW

    return MoLFAdamW.from_config(model, cfg)
