"""LoRA on experts stored as 3-D tensors (transformers 5 Mixtral: ``gate_up_proj``, ``down_proj``).

Such experts have no ``nn.Linear`` to wrap, so the adapter is a weight parametrization:
``W_e <- W_e + lora_scale * scaling * B_e A_e`` on the rows of one target, for every expert ``e``.
Merging is ``torch.nn.utils.parametrize.remove_parametrizations(..., leave_parametrized=True)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from molf.model.strategies.lora_linear import lora_scaling

# target -> (fused tensor, which half of its output rows): gate and up share ``gate_up_proj`` (gate first).
FUSED_TARGETS = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None)}


class ExpertsLoRADelta(nn.Module):
    """Parametrization adding one LoRA per expert to rows ``[row_start, row_end)`` of a (E, out, in) tensor.

    Args:
        num_experts: E.
        rows: ``(row_start, row_end)`` of the output dimension the adapter covers.
        out_total: total output rows of the tensor.
        in_features: input dimension.
        r, lora_alpha, use_rslora: as in ``LoRALinear``.
        like: a tensor whose device and dtype the adapter takes.
    """

    def __init__(self, num_experts: int, rows: tuple[int, int], out_total: int, in_features: int,
                 r: int, lora_alpha: float, use_rslora: bool, like: torch.Tensor) -> None:
        super().__init__()
        self.rows = rows
        self.out_total = out_total
        self.role = "ffn"
        self.lora_scale = 1.0
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        kw = dict(device=like.device, dtype=like.dtype)
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, rows[1] - rows[0], r, **kw))
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def lora_parameters(self) -> list[nn.Parameter]:
        """``[lora_A (E, r, in), lora_B (E, rows, r)]``."""
        return [self.lora_A, self.lora_B]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (E, out, in) -> the adapted weight, same shape and dtype."""
        delta = torch.bmm(self.lora_B, self.lora_A) * (self.lora_scale * self.scaling)  # (E, rows, in)
        delta = F.pad(delta, (0, 0, self.rows[0], self.out_total - self.rows[1]))  # (E, out, in)
        return weight + delta.to(weight.dtype)


def inject_fused_expert_lora(experts: nn.Module, targets: list[str], r: int, lora_alpha: float,
                             use_rslora: bool) -> int:
    """Register an ``ExpertsLoRADelta`` on ``experts`` for each of ``targets`` it stores.

    Args:
        experts: a module with 3-D ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I) parameters.
        targets: FFN target names (``gate_proj``, ``up_proj``, ``down_proj``).
        r, lora_alpha, use_rslora: adapter settings.

    Returns:
        The number of adapters registered.
    """
    count = 0
    for target in targets:
        if target not in FUSED_TARGETS:
            continue
        tensor_name, half = FUSED_TARGETS[target]
        weight = getattr(experts, tensor_name)
        num_experts, out_total, in_features = weight.shape
        rows = (0, out_total) if half is None else (half * out_total // 2, (half + 1) * out_total // 2)
        delta = ExpertsLoRADelta(num_experts, rows, out_total, in_features, r, lora_alpha, use_rslora, weight)
        parametrize.register_parametrization(experts, tensor_name, delta)
        count += 1
    return count


def fused_base_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The original (unadapted) expert tensors of every parametrized fused-experts module."""
    params = []
    for module in model.modules():
        if parametrize.is_parametrized(module):
            params += [p.original for name, p in module.parametrizations.items()
                       if any(isinstance(m, ExpertsLoRADelta) for m in p)]
    return params


def merge_fused_expert_lora(model: nn.Module) -> int:
    """Fold every ``ExpertsLoRADelta`` into its tensor and drop the parametrizations.

    Returns:
        The number of merged tensors.
    """
    count = 0
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for name in list(module.parametrizations.keys()):
            if any(isinstance(m, ExpertsLoRADelta) for m in module.parametrizations[name]):
                with torch.no_grad():
                    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                count += 1
    return count
