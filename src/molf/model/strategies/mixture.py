"""``mixture_lora``: each target FFN linear becomes a frozen base plus a routed mixture of E LoRA experts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from molf.model.dropout import LoRADropout
from molf.model.strategies.blocks import target_linears
from molf.model.strategies.dense import lora_settings, scoped_blocks
from molf.model.strategies.lora_linear import lora_scaling, replace_module
from molf.model.strategies.routing import TopKRouter, dispatch

# Small random B so the E experts start different and the router sees distinct deltas (DESIGN section 6).
EXPERT_B_INIT_STD = 0.01


class MixtureLoRALinear(nn.Module):
    """Frozen base linear plus a per-token top-k mixture of E LoRA experts.

    ``y_t = base(x_t) + scaling * sum_{e in topk(p_t)} p_te B_e A_e dropout(x_t)``, with
    ``p_t = softmax(router(x_t))`` computed in fp32. The gates are the raw softmax probabilities (not
    renormalised over the top-k) so the router gets a task gradient even with ``top_k = 1``. Experts
    that no token selected are not evaluated.

    Args:
        base: the linear to adapt.
        num_experts: E.
        top_k: experts per token.
        r, lora_alpha, lora_dropout, use_rslora: adapter settings shared by the experts.
        b_init_std: std of each expert's B at init.

    Raises:
        ValueError: if ``top_k > num_experts``.
    """

    def __init__(self, base: nn.Linear, num_experts: int, top_k: int, r: int, lora_alpha: float,
                 lora_dropout: float = 0.0, use_rslora: bool = True, b_init_std: float = EXPERT_B_INIT_STD) -> None:
        super().__init__()
        self.base = base
        self.num_experts = num_experts
        self.r = r
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        weight = base.weight
        self.router = TopKRouter(base.in_features, num_experts, top_k, renormalize=False, device=weight.device)
        kw = dict(device=weight.device, dtype=weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, base.in_features, **kw))  # (E, r, in)
        self.lora_B = nn.Parameter(torch.empty(num_experts, base.out_features, r, **kw))  # (E, out, r)
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.normal_(self.lora_B, std=b_init_std)
        self.lora_dropout = LoRADropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

    def lora_parameters(self) -> list[nn.Parameter]:
        """``[lora_A (E, r, in), lora_B (E, out, r)]``."""
        return [self.lora_A, self.lora_B]

    def expert_delta(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """``scaling * B_e A_e x`` for tokens ``x`` (n, in) -> (n, out)."""
        return F.linear(F.linear(x, self.lora_A[e]), self.lora_B[e]) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(..., in)`` -> ``(..., out)``."""
        y = self.base(x)  # (..., out)
        tokens = x.reshape(-1, x.shape[-1])  # (T, in)
        routing = self.router(tokens)
        delta = dispatch(self.lora_dropout(tokens), routing, self.num_experts, self.expert_delta)  # (T, out)
        if delta is None:
            return y
        return y + delta.reshape(y.shape).to(y.dtype)


def inject_mixture_lora(model: nn.Module, cfg) -> int:
    """Replace each FFN target linear of the scoped blocks by a ``MixtureLoRALinear``.

    Args:
        model: a transformers causal LM.
        cfg: a config with ``StrategyConfig`` (``num_experts``, ``expert_top_k``, scope, targets) and
            ``LoRAConfig`` fields.

    Returns:
        The number of wrapped linears.

    Raises:
        ValueError: if a scoped block has no ``nn.Linear`` FFN target (e.g. Mixtral's fused experts).
    """
    lora, count = lora_settings(cfg), 0
    for block in scoped_blocks(model, cfg):
        found = target_linears(block.mlp, cfg.ffn_targets)
        if not found:
            raise ValueError(f"mixture_lora found no nn.Linear FFN targets {cfg.ffn_targets} in {block.name} "
                             "(fused 3-D experts cannot host a routed mixture); use dense_lora for this model "
                             "or set ffn_targets to its FFN linears")
        for name, linear in found:
            replace_module(block.mlp, name, MixtureLoRALinear(
                linear, cfg.num_experts, cfg.expert_top_k, lora.r, lora.lora_alpha, lora.lora_dropout,
                lora.use_rslora))
        count += len(found)
    return count
