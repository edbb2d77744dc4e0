"""``moe_expert_lora``: each block's FFN becomes a routed MoE of N LoRA-adapted copies of itself."""

from __future__ import annotations

import copy

import torch
from torch import nn

from molf.model.strategies.blocks import target_linears
from molf.model.strategies.dense import LoRASettings, lora_settings, scoped_blocks, wrap_linears
from molf.model.strategies.lora_linear import replace_module
from molf.model.strategies.routing import TopKRouter, dispatch


class MoEExpertFFN(nn.Module):
    """A token-level top-k MoE over N copies of one FFN, each copy carrying LoRA on its target linears.

    ``y_t = sum_{e in topk(p_t)} g_te FFN_e(x_t)`` with ``p_t = softmax(router(x_t))`` (fp32) and the
    gates ``g`` renormalised to sum to 1 over the selected experts. At init every copy equals the
    original FFN and every B is zero, so the MoE computes exactly the original FFN. Copies other than
    their adapters start frozen; the phase ``base_ffn`` unfreezes them. With ``top_k = 1`` the gate is
    1 and the router learns only from the router losses (as in Mixtral).

    Args:
        mlp: the original FFN (a module mapping (..., H) -> (..., H) token-wise).
        hidden_size: H.
        num_experts: N copies.
        top_k: copies per token.
        targets: FFN linear names that get LoRA in every copy.
        lora: adapter settings.

    Raises:
        ValueError: if the FFN has none of ``targets`` as ``nn.Linear`` or ``top_k > num_experts``.
    """

    def __init__(self, mlp: nn.Module, hidden_size: int, num_experts: int, top_k: int, targets: list[str],
                 lora: LoRASettings) -> None:
        super().__init__()
        if not target_linears(mlp, targets):
            raise ValueError(f"moe_expert_lora needs nn.Linear FFN targets {targets} in {type(mlp).__name__} "
                             "(fused 3-D experts are already an MoE); use dense_lora for this model")
        self.num_experts = num_experts
        device = next(mlp.parameters()).device
        self.router = TopKRouter(hidden_size, num_experts, top_k, renormalize=True, device=device)
        self.experts = nn.ModuleList(copy.deepcopy(mlp) for _ in range(num_experts))
        for expert in self.experts:
            wrap_linears(expert, targets, lora, role="ffn")

    def _run_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.experts[e](x)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``hidden_states``: ``(..., H)`` -> ``(..., H)``."""
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])  # (T, H)
        routing = self.router(tokens)
        out = dispatch(tokens, routing, self.num_experts, self._run_expert)  # (T, H)
        if out is None:
            return torch.zeros_like(hidden_states)
        return out.reshape(hidden_states.shape).to(hidden_states.dtype)


def inject_moe_expert_lora(model: nn.Module, cfg) -> int:
    """Replace the FFN of each scoped block by a ``MoEExpertFFN``.

    Args:
        model: a transformers causal LM (``model.config.hidden_size`` is the router's input size).
        cfg: a config with ``StrategyConfig`` and ``LoRAConfig`` fields.

    Returns:
        The number of FFNs replaced.

    Raises:
        ValueError: if a scoped FFN has no ``nn.Linear`` target.
    """
    lora = lora_settings(cfg)
    blocks = scoped_blocks(model, cfg)
    hidden_size = model.config.hidden_size
    for block in blocks:
        moe = MoEExpertFFN(block.mlp, hidden_size, cfg.num_experts, cfg.expert_top_k, cfg.ffn_targets, lora)
        replace_module(model, block.mlp_name, moe)
    return len(blocks)
