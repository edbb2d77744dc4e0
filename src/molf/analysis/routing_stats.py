"""Routing statistics computed on the dense arrays of a ``RoutingLog`` (no per-row Python work).

The "focus" expert is the one whose share the routing-dynamics figures show: the FFT expert when the
run has one (MoLF), else the LoRA expert of the highest rank (MoLF-E).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd

from molf.analysis.routing_log import RoutingLog


def focus_expert(log: RoutingLog) -> int:
    """Index of the FFT expert, else of the highest-rank LoRA expert, else of the last expert."""
    for i, name in enumerate(log.experts):
        if name.lower().startswith("fft") or name.lower() == "full":
            return i
    ranked = [(rank, i) for i, rank in enumerate(log.ranks) if rank is not None]
    return max(ranked)[1] if ranked else len(log.experts) - 1


def focus_label(log: RoutingLog) -> str:
    """Axis/legend wording of the focus expert: ``FFT`` or ``lora1_r128 (highest-rank LoRA)``."""
    name = log.experts[focus_expert(log)]
    if name.lower().startswith("fft") or name.lower() == "full":
        return "FFT"
    return f"{name} (highest-rank LoRA)" if any(r is not None for r in log.ranks) else name


def type_order(log: RoutingLog) -> list[str]:
    """Module types in the canonical projection order (q, k, v, o, gate, up, down), then the rest."""
    canonical = ["q", "k", "v", "o", "gate", "up", "down"]
    present = list(dict.fromkeys(log.module_types))
    return [t for t in canonical if t in present] + [t for t in present if t not in canonical]


def share_by_type(log: RoutingLog, expert: Optional[int] = None) -> pd.DataFrame:
    """Fraction of modules of each type routed to ``expert`` (default: focus) per step; column ``all`` too."""
    expert = focus_expert(log) if expert is None else expert
    routed = log.winners[:, :, expert]  # (S, M)
    types = np.array(log.module_types)
    columns = {t: routed[:, types == t].mean(axis=1) for t in type_order(log)}
    columns["all"] = routed.mean(axis=1) if routed.shape[1] else np.full(len(log.steps), np.nan)
    return pd.DataFrame(columns, index=pd.Index(log.steps, name="step"))


def share_by_layer(log: RoutingLog, expert: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """``(layers (L,), share (L, S))``: fraction of each layer's modules routed to ``expert`` per step.

    Modules without a layer index are grouped under layer -1.
    """
    expert = focus_expert(log) if expert is None else expert
    routed = log.winners[:, :, expert]  # (S, M)
    layer_of = log.layers
    layers = np.unique(layer_of)
    share = np.stack([routed[:, layer_of == layer].mean(axis=1) for layer in layers]) if len(layers) else \
        np.zeros((0, len(log.steps)))
    return layers, share


def winner_codes(log: RoutingLog) -> np.ndarray:
    """(S, M) int64: the winner set of each module at each step as a bit mask over experts."""
    assert log.winners.shape[2] <= 62, "winner sets are packed into int64 bit masks"
    weights = np.left_shift(1, np.arange(log.winners.shape[2], dtype=np.int64))  # (E,)
    return log.winners.astype(np.int64) @ weights


def switches_per_module(log: RoutingLog) -> np.ndarray:
    """(M,) number of logged steps at which a module's winner set differs from the previous one."""
    codes = winner_codes(log)
    if len(codes) < 2:
        return np.zeros(codes.shape[1], dtype=np.int64)
    return (codes[1:] != codes[:-1]).sum(axis=0)


def switch_rate_per_module(log: RoutingLog) -> np.ndarray:
    """(M,) switches per logged step transition (0 when fewer than two steps were logged)."""
    transitions = max(len(log.steps) - 1, 1)
    return switches_per_module(log) / transitions


def score_log_ratio(log: RoutingLog, expert: Optional[int] = None) -> np.ndarray:
    """(S, M) ``log10(score[expert] / best score of the other experts)``; NaN where undefined.

    Positive: ``expert`` wins; a score of exactly zero (warmup's first step) gives NaN.
    """
    expert = focus_expert(log) if expert is None else expert
    others = np.delete(log.scores, expert, axis=2)  # (S, M, E-1)
    if others.shape[2] == 0:
        return np.full(log.scores.shape[:2], np.nan)
    with np.errstate(all="ignore"):
        all_nan = np.isnan(others).all(axis=2)
        best_other = np.where(all_nan, np.nan, np.nanmax(np.where(all_nan[..., None], 0.0, others), axis=2))
        ratio = np.log10(log.scores[:, :, expert] / best_other)
    ratio[~np.isfinite(ratio)] = np.nan
    return ratio


def summarize(log: RoutingLog, tail_fraction: float = 0.1) -> pd.DataFrame:
    """Per module type (and ``all``): modules, % routed to the focus expert over the last
    ``tail_fraction`` of logged steps, total switches and switches per module."""
    if not 0.0 < tail_fraction <= 1.0:
        raise ValueError(f"tail_fraction must be in (0, 1], got {tail_fraction}")
    num_steps = len(log.steps)
    tail = max(1, int(np.ceil(num_steps * tail_fraction))) if num_steps else 0
    routed = log.winners[num_steps - tail:, :, focus_expert(log)]  # (tail, M)
    switches = switches_per_module(log)
    types = np.array(log.module_types)
    rows = []
    for name in type_order(log) + ["all"]:
        mask = np.ones(len(types), dtype=bool) if name == "all" else types == name
        rows.append({
            "module_type": name,
            "modules": int(mask.sum()),
            "focus_pct_last": 100.0 * routed[:, mask].mean() if tail and mask.any() else np.nan,
            "switches": int(switches[mask].sum()),
            "switches_per_module": switches[mask].mean() if mask.any() else np.nan,
        })
    return pd.DataFrame(rows).set_index("module_type")


def format_summary(log: RoutingLog, tail_fraction: float = 0.1) -> str:
    """The summary as a plain-text report."""
    table = summarize(log, tail_fraction)
    steps = log.steps
    span = f"steps {steps[0]}..{steps[-1]}, {len(steps)} logged" if len(steps) else "no steps logged"
    label = focus_label(log)
    lines = [
        f"Routing summary ({span}; {len(log.modules)} modules; experts: {', '.join(log.experts)})",
        f"% {label} = share of modules routed to {label} over the last {tail_fraction:.0%} of logged steps",
        f"{'type':<8} {'modules':>7} {'% ' + label.split(' ')[0]:>14} {'switches':>9} {'per module':>11}",
    ]
    for name, row in table.iterrows():
        lines.append(f"{name:<8} {int(row.modules):>7d} {row.focus_pct_last:>14.1f} {int(row.switches):>9d} "
                     f"{row.switches_per_module:>11.2f}")
    return "\n".join(lines)
