"""Routing score functions (DESIGN section 1) and their registry.

A score function has two pure halves so the optimizer can evaluate it for every expert of every
module with a few multi-tensor kernels and no host sync:

- ``tensor_sums(exp_avgs, exp_avg_sq_sqrts, eps_s) -> Tensor[P]``: one fp32 sum per tensor;
- ``combine(sums[M, E], numel[M, E], lr[M, E]) -> scores[M, E]``: the per-expert score from the sums
  of all the expert's tensors, its element count ``N_e`` and its scheduled learning rate;
- optionally ``term(m, sqrt_v, eps_s) -> Tensor``: the elementwise terms whose sum ``tensor_sums``
  computes, as plain tensor ops, for the compiled single-pass score (``score_backend="compile"``);
- optionally ``native_term``: the name of the same term in the native CPU kernel
  (``"ratio_times_m"`` or ``"ratio_squared"``, see ``molf.optim.native``); a score without one uses
  the ``eager`` pre-pass where ``auto`` would pick ``native``.

Both use the *uncorrected* moments ``m``, ``v`` and ``eps_s = 1e-8``:

- EPD (``true_projected``, Eq. 10): ``lr_e / N_e * sum m^2 / (sqrt(v) + eps_s)``
- PFN (``projected``, Eq. 11): ``sqrt(sum (m / (sqrt(v) + eps_s))^2) / sqrt(N_e)``

To add a score, write the two functions and register them with ``register_score``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

SCORE_EPS = 1e-8

TensorSums = Callable[[list[Tensor], list[Tensor], float], Tensor]
Combine = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ScoreFn:
    """A routing score: per-tensor sums, then their combination per expert."""

    name: str
    tensor_sums: TensorSums
    combine: Combine
    term: Callable[[Tensor, Tensor, float], Tensor] | None = None
    native_term: str | None = None


def _ratio(exp_avgs: list[Tensor], sqrts: list[Tensor], eps_s: float) -> list[Tensor]:
    """``m / (sqrt(v) + eps_s)`` per tensor (new tensors; the inputs are not modified)."""
    return torch._foreach_div(exp_avgs, torch._foreach_add(sqrts, eps_s))


def _stack_fp32(values: tuple[Tensor, ...] | list[Tensor]) -> Tensor:
    return torch.stack([v.float() for v in values]) if values[0].dtype != torch.float32 else torch.stack(values)


def epd_tensor_sums(exp_avgs: list[Tensor], sqrts: list[Tensor], eps_s: float = SCORE_EPS) -> Tensor:
    """``sum m^2 / (sqrt(v) + eps_s)`` per tensor -> ``(P,)`` fp32."""
    terms = _ratio(exp_avgs, sqrts, eps_s)
    torch._foreach_mul_(terms, exp_avgs)  # m^2 / (sqrt(v) + eps_s) >= 0, so the L1 norm is the sum
    return _stack_fp32(torch._foreach_norm(terms, 1, dtype=torch.float32))


def epd_combine(sums: Tensor, numel: Tensor, lr: Tensor) -> Tensor:
    """EPD = ``lr_e / N_e * sum``; all arguments ``(M, E)``."""
    return lr * sums / numel


def pfn_tensor_sums(exp_avgs: list[Tensor], sqrts: list[Tensor], eps_s: float = SCORE_EPS) -> Tensor:
    """``sum (m / (sqrt(v) + eps_s))^2`` per tensor -> ``(P,)`` fp32."""
    norms = _stack_fp32(torch._foreach_norm(_ratio(exp_avgs, sqrts, eps_s), 2, dtype=torch.float32))
    return norms * norms


def pfn_combine(sums: Tensor, numel: Tensor, lr: Tensor) -> Tensor:
    """PFN = ``sqrt(sum) / sqrt(N_e)``; independent of the learning rate. Arguments ``(M, E)``."""
    return torch.sqrt(sums) / torch.sqrt(numel)


SCORE_FNS: dict[str, ScoreFn] = {}


def register_score(fn: ScoreFn) -> ScoreFn:
    """Add ``fn`` to the registry under ``fn.name`` (the value of ``--molf_score_fn``)."""
    SCORE_FNS[fn.name] = fn
    return fn


def epd_term(m: Tensor, sqrt_v: Tensor, eps_s: float) -> Tensor:
    """Elementwise ``m^2 / (sqrt(v) + eps_s)``."""
    return m * m / (sqrt_v + eps_s)


def pfn_term(m: Tensor, sqrt_v: Tensor, eps_s: float) -> Tensor:
    """Elementwise ``(m / (sqrt(v) + eps_s))^2``."""
    ratio = m / (sqrt_v + eps_s)
    return ratio * ratio


register_score(ScoreFn("true_projected", epd_tensor_sums, epd_combine, epd_term, native_term="ratio_times_m"))
register_score(ScoreFn("projected", pfn_tensor_sums, pfn_combine, pfn_term, native_term="ratio_squared"))


def get_score_fn(name: str) -> ScoreFn:
    """Look up a registered score function.

    Raises:
        ValueError: if ``name`` is not registered.
    """
    if name not in SCORE_FNS:
        raise ValueError(f"unknown molf_score_fn {name!r}; choose one of {sorted(SCORE_FNS)}")
    return SCORE_FNS[name]


def select_topk(scores: Tensor, k: int) -> Tensor:
    """Winners of each row: the ``k`` largest finite scores, ties to the lower column index.

    Args:
        scores: ``(M, E)`` scores; non-finite entries (and ``-inf`` padding) never win.
        k: experts to select per row.

    Returns:
        ``(M, E)`` bool mask with at most ``k`` winners per row.
    """
    finite = torch.isfinite(scores)
    s = torch.where(finite, scores, torch.full_like(scores, float("-inf")))
    num_experts = scores.shape[1]
    col = torch.arange(num_experts, device=scores.device)
    lower = col[None, :] < col[:, None]  # (E, E): [e, e'] = e' comes before e
    s_e, s_other = s[:, :, None], s[:, None, :]  # (M, E, 1), (M, 1, E)
    beats = (s_other > s_e) | ((s_other == s_e) & lower[None])  # (M, E, E): e' ranks above e
    return finite & (beats.sum(dim=-1) < k)
