"""``LoRALinear``: a frozen ``nn.Linear`` plus one low-rank adapter, the building block of the strategies."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from molf.model.dropout import LoRADropout

Role = Literal["ffn", "attn"]


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """peft's scaling: ``alpha / sqrt(r)`` with rsLoRA, ``alpha / r`` without."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class LoRALinear(nn.Module):
    """A base linear and one LoRA adapter.

    ``y = base(x) + lora_scale * scaling * B A dropout(x)`` with ``scaling = lora_alpha / sqrt(r)``
    (rsLoRA) or ``lora_alpha / r``. ``lora_scale`` (1 by default) is the handoff fade multiplier; at 0
    the adapter is skipped entirely. A is Kaiming-uniform (a = sqrt(5)), B is zero (or N(0, b_init_std)).

    Args:
        base: the linear to adapt; kept as the submodule ``base`` so its parameter names stay visible.
        r: adapter rank.
        lora_alpha: peft's ``lora_alpha``.
        lora_dropout: dropout on the adapter's input only.
        use_rslora: rank-stabilised scaling.
        role: ``"ffn"`` or ``"attn"``; decides the trainable group (``lora`` or ``attn_lora``).
        b_init_std: standard deviation of B at init (0 gives the exact base function).

    Raises:
        ValueError: if ``r`` is not positive.
    """

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = True, role: Role = "ffn", b_init_std: float = 0.0) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        self.base = base
        self.r = r
        self.lora_alpha = float(lora_alpha)
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, self.lora_alpha, use_rslora)
        self.role = role
        self.lora_scale = 1.0
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=weight.device, dtype=weight.dtype))
        self.lora_dropout = LoRADropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if b_init_std > 0:
            nn.init.normal_(self.lora_B, std=b_init_std)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def effective_scaling(self) -> float:
        """``lora_scale * scaling``: the factor in front of ``B A`` right now."""
        return self.lora_scale * self.scaling

    def lora_parameters(self) -> list[nn.Parameter]:
        """``[lora_A, lora_B]``."""
        return [self.lora_A, self.lora_B]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(..., in)`` -> ``(..., out)``."""
        y = self.base(x)  # (..., out)
        if self.lora_scale == 0.0:
            return y
        h = F.linear(self.lora_dropout(x), self.lora_A)  # (..., r)
        return y + F.linear(h, self.lora_B) * self.effective_scaling()

    def delta_weight(self) -> torch.Tensor:
        """``lora_scale * scaling * B @ A`` in fp32, shape (out, in)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.effective_scaling()

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Fold the adapter into the base weight (fp32 math, one cast back) and return the base linear.

        Returns:
            The base ``nn.Linear`` carrying ``W + lora_scale * scaling * B A``; use it in place of self.
        """
        weight = self.base.weight
        weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
        return self.base

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, use_rslora={self.use_rslora}, role={self.role}"


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule at dotted path ``name`` of ``root`` to ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def merge_lora_linears(model: nn.Module) -> int:
    """Replace every ``LoRALinear`` in ``model`` by its merged base linear.

    Args:
        model: any module tree.

    Returns:
        The number of merged modules.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    for name in names:
        replace_module(model, name, model.get_submodule(name).merge())
    return len(names)
