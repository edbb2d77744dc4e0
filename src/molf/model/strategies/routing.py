"""Top-k token routing shared by ``mixture_lora`` and ``moe_expert_lora``, with the router losses.

Router losses (computed on the fp32 logits of the tokens of one forward pass; when the trainer has
set ``token_mask`` (the batch's attention mask), padding tokens count in neither loss):

- z-loss (ST-MoE, Zoph et al. 2022): ``mean_t (logsumexp_e z_te)^2``; keeps logits small.
- load-balancing loss (Switch Transformer, Fedus et al. 2021): ``E * sum_e f_e * P_e`` with ``f_e`` the
  fraction of the ``T * k`` token-to-expert assignments that went to ``e`` and ``P_e`` the mean router
  probability of ``e``; it is 1 for perfectly uniform routing and grows with imbalance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """The outcome of routing ``T`` tokens to ``k`` of ``E`` experts."""

    weights: torch.Tensor  # (T, k) gate of each selected expert
    experts: torch.Tensor  # (T, k) index of each selected expert
    z_loss: torch.Tensor  # () fp32
    aux_loss: torch.Tensor  # () fp32


class TopKRouter(nn.Module):
    """``Linear(in -> E)`` without bias, evaluated in fp32 whatever the model dtype.

    Args:
        in_features: token dimension.
        num_experts: E.
        top_k: experts per token (at most E).
        renormalize: divide the selected probabilities by their sum (gates sum to 1).
        device: where to create the weight (fp32).

    Raises:
        ValueError: if ``top_k`` is not in ``[1, num_experts]``.
    """

    def __init__(self, in_features: int, num_experts: int, top_k: int, renormalize: bool,
                 device: torch.device | None = None) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"expert_top_k={top_k} must be in [1, num_experts={num_experts}]: lower expert_top_k")
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, device=device, dtype=torch.float32))
        nn.init.normal_(self.weight, std=in_features ** -0.5)
        # (z_loss, aux_loss) of the latest training forward; ``StrategyRuntime.extra_loss`` takes it.
        self.last_losses: tuple[torch.Tensor, torch.Tensor] | None = None
        # (T,) 1 for the real tokens of the current batch, 0 for padding; None: every token counts. It
        # stays set until the next batch's, so that a recomputed forward (gradient checkpointing) sees it.
        self.token_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> Routing:
        """Route tokens ``x`` (T, in); keeps the losses in ``last_losses`` when training with gradients."""
        with torch.autocast(device_type=x.device.type, enabled=False):  # fp32 under bf16_mixed too
            logits = F.linear(x.float(), self.weight.float())  # (T, E) fp32
            probs = logits.softmax(dim=-1)  # (T, E)
            top_p, top_i = probs.topk(self.top_k, dim=-1)  # (T, k)
            if self.renormalize:
                top_p = top_p / top_p.sum(dim=-1, keepdim=True)
            z_loss, aux_loss = self._losses(logits, probs, top_i)
        if self.training and torch.is_grad_enabled():
            self.last_losses = (z_loss, aux_loss)
        return Routing(top_p, top_i, z_loss, aux_loss)

    def _losses(self, logits: torch.Tensor, probs: torch.Tensor,
                top_i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_loss, aux_loss) over the tokens ``token_mask`` keeps (all when unset or of another size)."""
        mask = self.token_mask
        if mask is None or mask.numel() != logits.shape[0]:
            weight = logits.new_ones(logits.shape[0])  # (T,)
        else:
            weight = mask.reshape(-1).to(device=logits.device, dtype=torch.float32)  # (T,)
        tokens = weight.sum().clamp_min(1.0)  # weights, not boolean indexing: no host sync
        z_loss = (torch.logsumexp(logits, dim=-1).square() * weight).sum() / tokens
        assigned = (F.one_hot(top_i, self.num_experts).sum(dim=1).float() * weight[:, None]).sum(dim=0)  # (E,)
        fraction = assigned / (tokens * self.top_k)
        mean_prob = (probs * weight[:, None]).sum(dim=0) / tokens  # (E,)
        return z_loss, self.num_experts * (fraction * mean_prob).sum()


def dispatch(x: torch.Tensor, routing: Routing, num_experts: int, expert_fn) -> torch.Tensor:
    """``sum_k gate_tk * expert_fn(e_tk, x_t)`` evaluating each expert only on the tokens routed to it.

    Args:
        x: tokens (T, in).
        routing: top-k choice per token.
        num_experts: E.
        expert_fn: ``(expert index, tokens (n, in)) -> (n, out)``.

    Returns:
        (T, out) in ``x``'s dtype, or None if no expert received a token (T = 0).
    """
    top_k = routing.experts.shape[-1]
    flat = routing.experts.reshape(-1)  # (T*k,) expert of each assignment, token-major
    order = torch.argsort(flat, stable=True)  # assignments grouped by expert, tokens ascending
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # the one host sync, to size the groups
    out = None
    for e, group in enumerate(order.split(counts)):
        if group.numel() == 0:
            continue
        token_idx, slot = group // top_k, group % top_k  # (n,), (n,)
        y = expert_fn(e, x[token_idx])  # (n, out)
        y = y * routing.weights[token_idx, slot, None].to(y.dtype)
        if out is None:
            out = y.new_zeros(x.shape[0], y.shape[-1])
        out.index_add_(0, token_idx, y)
    return out
