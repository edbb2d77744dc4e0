"""Training phases of the LoRA strategies: which parameter groups train from which optimizer step.

``phases: [{step: 0, trainable: [router, lora]}, {step: 200, trainable: [lora, base_ffn]}]`` means
steps 0..199 train the routers and adapters, and from step 200 on the adapters and the base FFN.
Pure schedule logic: no torch, no model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

TRAINABLE_KINDS = ("router", "lora", "attn_lora", "base_ffn")
ROUTED_MODES = ("mixture_lora", "moe_expert_lora")


@dataclass(frozen=True)
class Phase:
    """From optimizer step ``step`` on, the groups in ``trainable`` train (all others are frozen)."""

    step: int
    trainable: tuple[str, ...]


def default_phases(mode: str, attn_lora: bool) -> list[Phase]:
    """One phase from step 0 training what the strategy adds (routers, adapters, attention adapters)."""
    kinds = (("router",) if mode in ROUTED_MODES else ()) + ("lora",) + (("attn_lora",) if attn_lora else ())
    return [Phase(0, kinds)]


def _parse_one(i: int, item: Any) -> Phase:
    if not isinstance(item, dict) or set(item) != {"step", "trainable"}:
        raise ValueError(f"phases[{i}] must be a mapping with exactly the keys step and trainable, "
                         f"e.g. {{step: 0, trainable: [router, lora]}}; got {item!r}")
    step, trainable = item["step"], item["trainable"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"phases[{i}].step must be a non-negative integer, got {step!r}")
    if isinstance(trainable, str):
        trainable = [trainable]
    unknown = [k for k in trainable if k not in TRAINABLE_KINDS]
    if unknown or not trainable:
        raise ValueError(f"phases[{i}].trainable must list some of {list(TRAINABLE_KINDS)}, got {trainable!r}")
    return Phase(step, tuple(dict.fromkeys(trainable)))


def parse_phases(raw: Optional[Sequence[dict]], mode: str, attn_lora: bool) -> list[Phase]:
    """Validate the ``phases`` config field and return the phases in step order.

    Args:
        raw: the config value (None gives ``default_phases``).
        mode: the strategy mode.
        attn_lora: whether attention adapters exist.

    Returns:
        Phases with strictly increasing steps, the first at step 0.

    Raises:
        ValueError: on a malformed phase, unknown group, steps not strictly increasing or not starting at
            0, or ``attn_lora`` trained without attention adapters.
    """
    if raw is None:
        return default_phases(mode, attn_lora)
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ValueError("phases must be a non-empty list like [{step: 0, trainable: [lora]}] (or omitted)")
    phases = [_parse_one(i, item) for i, item in enumerate(raw)]
    steps = [p.step for p in phases]
    if steps[0] != 0:
        raise ValueError(f"the first phase must start at step 0 (got {steps[0]}): say what trains from the start")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"phase steps must be strictly increasing, got {steps}")
    if not attn_lora and any("attn_lora" in p.trainable for p in phases):
        raise ValueError("a phase trains attn_lora but attention LoRA is off: set attn_lora: true or drop attn_lora")
    return phases


def phase_warnings(phases: Sequence[Phase], mode: str, total_steps: Optional[int]) -> list[str]:
    """Legal but suspicious phase plans: an untrained router, a router in a dense strategy, dead phases."""
    warnings = []
    trained = {k for p in phases for k in p.trainable}
    if mode in ROUTED_MODES and "router" not in trained:
        warnings.append(f"no phase trains the router of {mode}: routing stays at its random init")
    if mode not in ROUTED_MODES and "router" in trained:
        warnings.append(f"{mode} has no router: 'router' in phases trains nothing")
    if total_steps is not None:
        late = [p.step for p in phases if p.step >= total_steps]
        if late:
            warnings.append(f"phases starting at steps {late} never run (training has {total_steps} optimizer steps)")
    return warnings


def phase_index_at(phases: Sequence[Phase], step: int) -> int:
    """Index of the phase active at optimizer step ``step`` (the last one starting at or before it)."""
    index = 0
    for i, phase in enumerate(phases):
        if phase.step <= step:
            index = i
    return index


def first_step_training(phases: Sequence[Phase], kind: str) -> Optional[int]:
    """The first step at which ``kind`` trains, or None if no phase trains it."""
    return next((p.step for p in phases if kind in p.trainable), None)


def describe_phases(phases: Sequence[Phase]) -> str:
    """``phases: 0:[router,lora] -> 200:[lora,base_ffn]``."""
    return "phases: " + " -> ".join(f"{p.step}:[{','.join(p.trainable)}]" for p in phases)
