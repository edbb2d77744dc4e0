"""LoRA handoff schedule (``moe_expert_lora``): fade adapters out while the base FFN copies take over.

Config (the ``handoff`` field of ``StrategyConfig``)::

    handoff:
      fade:                  # one mapping, or a list with one per target
        target: ffn          # ffn (adapters of the FFN copies) | attn (attention adapters)
        start_step: 200
        duration: 100        # optimizer steps from 1 to end_scale
        end_scale: 0.0       # in [0, 1]
        curve: cosine        # linear | cosine
        end_action: freeze   # keep | freeze (stop training the faded adapters)
      lr_ramp: {start_step: 200, end_step: 300, start_multiplier: 0.1, end_multiplier: 1.0}
      export: {remove_zero_scale: true, merge: false}

Pure schedule logic: no torch, no model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from molf.train.phases import Phase, first_step_training, phase_index_at

FADE_TARGETS = {"ffn": "lora", "attn": "attn_lora"}  # fade target -> trainable group it scales
CURVES = ("linear", "cosine")
END_ACTIONS = ("keep", "freeze")


def fade_scale(step: int, start_step: int, duration: int, end_scale: float, curve: str) -> float:
    """The LoRA scale at ``step``: 1 before ``start_step``, ``end_scale`` from ``start_step + duration`` on.

    In between, with ``t = (step - start_step) / duration``: linear ``1 + (end - 1) t``; cosine
    ``end + (1 - end) (1 + cos(pi t)) / 2``.
    """
    if step <= start_step:
        return 1.0
    t = min(1.0, (step - start_step) / duration)
    if curve == "linear":
        return 1.0 + (end_scale - 1.0) * t
    return end_scale + (1.0 - end_scale) * 0.5 * (1.0 + math.cos(math.pi * t))


def ramp_multiplier(step: int, start_step: int, end_step: int, start_multiplier: float, end_multiplier: float) -> float:
    """Linear ramp of an LR multiplier: ``start_multiplier`` up to ``start_step``, ``end_multiplier`` from
    ``end_step``."""
    if step >= end_step:
        return end_multiplier
    if step <= start_step:
        return start_multiplier
    t = (step - start_step) / (end_step - start_step)
    return start_multiplier + (end_multiplier - start_multiplier) * t


@dataclass(frozen=True)
class Fade:
    """Fade of one target's LoRA scale from 1 to ``end_scale`` over ``[start_step, start_step + duration]``."""

    target: str
    start_step: int
    duration: int
    end_scale: float = 0.0
    curve: str = "linear"
    end_action: str = "keep"

    @property
    def end_step(self) -> int:
        return self.start_step + self.duration

    @property
    def kind(self) -> str:
        return FADE_TARGETS[self.target]

    def scale_at(self, step: int) -> float:
        return fade_scale(step, self.start_step, self.duration, self.end_scale, self.curve)

    def frozen_at(self, step: int) -> bool:
        return self.end_action == "freeze" and step >= self.end_step


@dataclass(frozen=True)
class LRRamp:
    """Base-FFN learning-rate multiplier ramped linearly over ``[start_step, end_step]``."""

    start_step: int
    end_step: int
    start_multiplier: float = 0.0
    end_multiplier: float = 1.0

    def multiplier_at(self, step: int) -> float:
        return ramp_multiplier(step, self.start_step, self.end_step, self.start_multiplier, self.end_multiplier)


@dataclass(frozen=True)
class HandoffExport:
    """At export: drop adapters whose scale is 0 (``remove_zero_scale``); fold the others in (``merge``)."""

    remove_zero_scale: bool = True
    merge: bool = False


@dataclass(frozen=True)
class Handoff:
    """The parsed ``handoff`` field: one fade per target, the optional base-FFN LR ramp, export options."""

    fades: tuple[Fade, ...]
    lr_ramp: Optional[LRRamp] = None
    export: HandoffExport = field(default_factory=HandoffExport)

    def fade_for(self, target: str) -> Optional[Fade]:
        return next((f for f in self.fades if f.target == target), None)

    def frozen_kinds_at(self, step: int) -> set[str]:
        """Trainable groups the fades' ``end_action: freeze`` has frozen by ``step``."""
        return {f.kind for f in self.fades if f.frozen_at(step)}


def _check_keys(where: str, raw: Any, allowed: set[str], required: set[str]) -> dict:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping, got {raw!r}")
    unknown, missing = set(raw) - allowed, required - set(raw)
    if unknown or missing:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}; "
                         f"allowed keys are {sorted(allowed)}")
    return raw


def _non_negative_int(where: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


def _parse_fade(where: str, raw: Any) -> Fade:
    raw = _check_keys(where, raw, {"target", "start_step", "duration", "end_scale", "curve", "end_action"},
                      {"start_step", "duration"})
    fade = Fade(target=raw.get("target", "ffn"), start_step=_non_negative_int(f"{where}.start_step", raw["start_step"]),
                duration=_non_negative_int(f"{where}.duration", raw["duration"], 1),
                end_scale=raw.get("end_scale", 0.0), curve=raw.get("curve", "linear"),
                end_action=raw.get("end_action", "keep"))
    if fade.target not in FADE_TARGETS:
        raise ValueError(f"{where}.target must be one of {list(FADE_TARGETS)}, got {fade.target!r}")
    if isinstance(fade.end_scale, bool) or not isinstance(fade.end_scale, (int, float)) \
            or not 0.0 <= fade.end_scale <= 1.0:
        raise ValueError(f"{where}.end_scale must be in [0, 1], got {fade.end_scale!r}")
    if fade.curve not in CURVES:
        raise ValueError(f"{where}.curve must be one of {list(CURVES)}, got {fade.curve!r}")
    if fade.end_action not in END_ACTIONS:
        raise ValueError(f"{where}.end_action must be one of {list(END_ACTIONS)}, got {fade.end_action!r}")
    return fade


def _parse_ramp(raw: Any) -> LRRamp:
    raw = _check_keys("handoff.lr_ramp", raw, {"start_step", "end_step", "start_multiplier", "end_multiplier"},
                      {"start_step", "end_step"})
    ramp = LRRamp(_non_negative_int("handoff.lr_ramp.start_step", raw["start_step"]),
                  _non_negative_int("handoff.lr_ramp.end_step", raw["end_step"]),
                  raw.get("start_multiplier", 0.0), raw.get("end_multiplier", 1.0))
    if ramp.end_step < ramp.start_step:
        raise ValueError(f"handoff.lr_ramp.end_step ({ramp.end_step}) must be >= start_step ({ramp.start_step})")
    for name in ("start_multiplier", "end_multiplier"):
        value = getattr(ramp, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"handoff.lr_ramp.{name} must be a finite number >= 0, got {value!r}")
    return ramp


def parse_handoff(raw: Any) -> Handoff:
    """Validate the ``handoff`` mapping field by field and build the schedule.

    Args:
        raw: the config value (see the module docstring).

    Returns:
        The parsed ``Handoff``.

    Raises:
        ValueError: unknown or missing keys, end_scale outside [0, 1], a curve other than linear/cosine, an
            end action other than keep/freeze, a non-positive duration, two fades of one target, a bad ramp.
    """
    raw = _check_keys("handoff", raw, {"fade", "lr_ramp", "export"}, {"fade"})
    fades_raw = raw["fade"] if isinstance(raw["fade"], list) else [raw["fade"]]
    if not fades_raw:
        raise ValueError("handoff.fade must describe at least one fade")
    fades = tuple(_parse_fade(f"handoff.fade[{i}]", f) for i, f in enumerate(fades_raw))
    targets = [f.target for f in fades]
    if len(set(targets)) != len(targets):
        raise ValueError(f"handoff.fade has two fades for one target ({targets}): keep one per target")
    ramp = _parse_ramp(raw["lr_ramp"]) if raw.get("lr_ramp") is not None else None
    export = _check_keys("handoff.export", raw.get("export") or {}, {"remove_zero_scale", "merge"}, set())
    for key, value in export.items():
        if not isinstance(value, bool):
            raise ValueError(f"handoff.export.{key} must be true or false, got {value!r}")
    return Handoff(fades, ramp, HandoffExport(**export))


def handoff_rules(handoff: Handoff, mode: str, phases: Sequence[Phase], attn_lora: bool,
                  total_steps: Optional[int]) -> list[str]:
    """Check the handoff against the strategy and phases (DESIGN section 6); return the warnings.

    Raises:
        ValueError: the mode is not moe_expert_lora; no phase unfreezes base_ffn; an attention fade without
            attention LoRA; a fade starting before base_ffn is unfrozen or not before the last step; a freeze
            that leaves nothing to train.
    """
    if mode != "moe_expert_lora":
        raise ValueError(f"handoff is only for mode moe_expert_lora (got {mode}): remove handoff or change the mode")
    unfreeze = first_step_training(phases, "base_ffn")
    if unfreeze is None:
        raise ValueError("handoff needs a phase that unfreezes base_ffn, e.g. {step: 200, trainable: [lora, base_ffn]}")
    for fade in handoff.fades:
        if fade.target == "attn" and not attn_lora:
            raise ValueError("the attention handoff fades attention LoRA, which is off: set attn_lora: true")
        if fade.start_step < unfreeze:
            raise ValueError(f"the {fade.target} fade starts at step {fade.start_step}, before base_ffn is unfrozen "
                             f"at step {unfreeze}: start the fade at step {unfreeze} or later")
        if total_steps is not None and fade.start_step >= total_steps - 1:
            raise ValueError(f"the {fade.target} fade starts at step {fade.start_step} but the last optimizer step is "
                             f"{total_steps - 1}: start it earlier")
    _check_something_trains(handoff, phases)
    return _handoff_warnings(handoff, total_steps)


def _check_something_trains(handoff: Handoff, phases: Sequence[Phase]) -> None:
    """A freeze at a fade's end must not leave a phase with nothing to train."""
    for step in sorted({p.step for p in phases} | {f.end_step for f in handoff.fades}):
        phase = phases[phase_index_at(phases, step)]
        if not set(phase.trainable) - handoff.frozen_kinds_at(step):
            raise ValueError(f"from step {step} nothing trains: phase {list(phase.trainable)} minus the adapters "
                             "frozen by end_action: freeze; add a group to that phase or use end_action: keep")


def _handoff_warnings(handoff: Handoff, total_steps: Optional[int]) -> list[str]:
    warnings = []
    ramp = handoff.lr_ramp
    for fade in handoff.fades:
        if ramp is not None and (ramp.start_step, ramp.end_step) != (fade.start_step, fade.end_step):
            warnings.append(f"the base_ffn LR ramp [{ramp.start_step}, {ramp.end_step}] and the {fade.target} fade "
                            f"[{fade.start_step}, {fade.end_step}] cover different windows")
        # The last optimizer step has index total_steps - 1: a fade ending at total_steps never gets there.
        if total_steps is not None and fade.end_step >= total_steps:
            warnings.append(f"the {fade.target} fade ends at step {fade.end_step}, after the last step "
                            f"({total_steps - 1}): its scale stops at {fade.scale_at(total_steps - 1):.3g} "
                            f"(saved with the final model), not {fade.end_scale:g}; end it by step "
                            f"{total_steps - 1} to reach end_scale")
    return warnings


def milestones(handoff: Optional[Handoff], phases: Sequence[Phase]) -> list[tuple[int, str]]:
    """``(step, event)`` for every phase boundary and handoff window edge, in step order."""
    events = [(p.step, f"phase {i} starts: training {','.join(p.trainable)}") for i, p in enumerate(phases) if i]
    for fade in handoff.fades if handoff else ():
        events.append((fade.start_step, f"{fade.target} LoRA fade starts ({fade.curve}, 1 -> {fade.end_scale:g})"))
        action = "frozen" if fade.end_action == "freeze" else "kept"
        events.append((fade.end_step, f"{fade.target} LoRA fade ends at scale {fade.end_scale:g}; adapters {action}"))
    ramp = handoff.lr_ramp if handoff else None
    if ramp is not None:
        events.append((ramp.start_step, f"base_ffn LR ramp starts at x{ramp.start_multiplier:g}"))
        events.append((ramp.end_step, f"base_ffn LR ramp ends at x{ramp.end_multiplier:g}"))
    return sorted(events, key=lambda e: e[0])


def summary_line(handoff: Handoff) -> str:
    """One line describing the whole handoff, printed at the start of training."""
    parts = [f"{f.target} LoRA 1->{f.end_scale:g} {f.curve} over [{f.start_step},{f.end_step}] then {f.end_action}"
             for f in handoff.fades]
    ramp = handoff.lr_ramp
    if ramp is not None:
        parts.append(f"base_ffn lr x{ramp.start_multiplier:g}->x{ramp.end_multiplier:g} over "
                     f"[{ramp.start_step},{ramp.end_step}]")
    export = handoff.export
    parts.append(f"export: remove_zero_scale={export.remove_zero_scale}, merge={export.merge}")
    return "handoff: " + "; ".join(parts)
