"""LoRA handoff: fade curves at sampled steps, the LR ramp, parsing and the DESIGN section 6 rules."""

from __future__ import annotations

import math

import pytest

from molf.train.handoff import (fade_scale, handoff_rules, milestones, parse_handoff, ramp_multiplier,
                                summary_line)
from molf.train.phases import parse_phases

PHASES = parse_phases([{"step": 0, "trainable": ["router", "lora"]}, {"step": 10, "trainable": ["lora", "base_ffn"]}],
                      "moe_expert_lora", attn_lora=True)
FADE = {"start_step": 10, "duration": 20, "end_scale": 0.0, "curve": "cosine", "end_action": "freeze"}
RAMP = {"start_step": 10, "end_step": 30, "start_multiplier": 0.1, "end_multiplier": 1.0}


@pytest.mark.parametrize("step, expected",
                         [(0, 1.0), (10, 1.0), (15, 0.75), (20, 0.5), (25, 0.25), (30, 0.0), (99, 0.0)])
def test_linear_fade(step, expected):
    assert fade_scale(step, 10, 20, 0.0, "linear") == pytest.approx(expected)


@pytest.mark.parametrize("step", [0, 10, 13, 20, 27, 30, 40])
def test_cosine_fade_to_a_floor(step):
    t = min(1.0, max(0.0, (step - 10) / 20))
    expected = 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * t))
    assert fade_scale(step, 10, 20, 0.2, "cosine") == pytest.approx(expected)
    assert fade_scale(20, 10, 20, 0.2, "cosine") == pytest.approx(0.6)  # halfway


def test_ramp():
    values = [ramp_multiplier(s, 10, 30, 0.1, 1.0) for s in (0, 10, 20, 30, 50)]
    assert values == pytest.approx([0.1, 0.1, 0.55, 1.0, 1.0])
    assert ramp_multiplier(4, 5, 5, 0.0, 2.0) == 0.0 and ramp_multiplier(5, 5, 5, 0.0, 2.0) == 2.0


def test_parse_defaults_and_freeze():
    handoff = parse_handoff({"fade": {"start_step": 10, "duration": 5}})
    (fade,) = handoff.fades
    assert (fade.target, fade.end_scale, fade.curve, fade.end_action) == ("ffn", 0.0, "linear", "keep")
    assert handoff.export.remove_zero_scale and not handoff.export.merge
    frozen = parse_handoff({"fade": FADE})
    assert frozen.frozen_kinds_at(29) == set() and frozen.frozen_kinds_at(30) == {"lora"}


@pytest.mark.parametrize("raw, match", [
    ({"fade": {**FADE, "end_scale": 1.5}}, r"end_scale must be in \[0, 1\]"),
    ({"fade": {**FADE, "end_scale": -0.1}}, r"end_scale must be in \[0, 1\]"),
    ({"fade": {**FADE, "curve": "exp"}}, "curve must be one of"),
    ({"fade": {**FADE, "end_action": "drop"}}, "end_action must be one of"),
    ({"fade": {**FADE, "target": "embed"}}, "target must be one of"),
    ({"fade": {**FADE, "duration": 0}}, "duration must be an integer >= 1"),
    ({"fade": {**FADE, "speed": 1}}, "unknown keys"),
    ({"fade": [FADE, FADE]}, "two fades for one target"),
    ({"lr_ramp": RAMP}, "missing keys"),
    ({"fade": FADE, "lr_ramp": {**RAMP, "end_step": 5}}, "must be >= start_step"),
    ({"fade": FADE, "lr_ramp": {**RAMP, "start_multiplier": -1}}, "finite number >= 0"),
    ({"fade": FADE, "export": {"merge": "yes"}}, "true or false"),
])
def test_bad_fields_raise(raw, match):
    with pytest.raises(ValueError, match=match):
        parse_handoff(raw)


def test_design_rules_raise():
    handoff = parse_handoff({"fade": FADE})
    with pytest.raises(ValueError, match="only for mode moe_expert_lora"):
        handoff_rules(handoff, "mixture_lora", PHASES, True, None)
    no_base = parse_phases([{"step": 0, "trainable": ["router", "lora"]}], "moe_expert_lora", False)
    with pytest.raises(ValueError, match="unfreezes base_ffn"):
        handoff_rules(handoff, "moe_expert_lora", no_base, False, None)
    attn = parse_handoff({"fade": {**FADE, "target": "attn"}})
    with pytest.raises(ValueError, match="attention handoff"):
        handoff_rules(attn, "moe_expert_lora", PHASES, False, None)
    early = parse_handoff({"fade": {**FADE, "start_step": 5}})
    with pytest.raises(ValueError, match="before base_ffn is unfrozen at step 10"):
        handoff_rules(early, "moe_expert_lora", PHASES, True, None)
    with pytest.raises(ValueError, match="last optimizer step is 10"):
        handoff_rules(handoff, "moe_expert_lora", PHASES, True, 11)
    (warning,) = handoff_rules(handoff, "moe_expert_lora", PHASES, True, 12)  # starts at 10 < 11: legal
    assert "after the last step (11)" in warning


def test_freeze_that_leaves_nothing_to_train_raises():
    phases = parse_phases([{"step": 0, "trainable": ["router", "lora"]}, {"step": 10, "trainable": ["base_ffn"]},
                           {"step": 40, "trainable": ["lora"]}], "moe_expert_lora", attn_lora=False)
    with pytest.raises(ValueError, match="from step 40 nothing trains"):
        handoff_rules(parse_handoff({"fade": FADE}), "moe_expert_lora", phases, False, None)
    keep = parse_handoff({"fade": {**FADE, "end_action": "keep"}})
    assert handoff_rules(keep, "moe_expert_lora", phases, False, None) == []


def test_warnings_on_windows():
    same = parse_handoff({"fade": FADE, "lr_ramp": RAMP})
    assert handoff_rules(same, "moe_expert_lora", PHASES, True, 100) == []
    shifted = parse_handoff({"fade": FADE, "lr_ramp": {**RAMP, "end_step": 40}})
    (warning,) = handoff_rules(shifted, "moe_expert_lora", PHASES, True, 100)
    assert "different windows" in warning
    assert any("after the last step" in w for w in handoff_rules(same, "moe_expert_lora", PHASES, True, 20))
    end = FADE["start_step"] + FADE["duration"]  # a fade ending exactly at total_steps never reaches end_scale
    (at_end,) = handoff_rules(same, "moe_expert_lora", PHASES, True, end)
    assert f"after the last step ({end - 1})" in at_end
    assert handoff_rules(same, "moe_expert_lora", PHASES, True, end + 1) == []


def test_milestones_and_summary():
    handoff = parse_handoff({"fade": FADE, "lr_ramp": RAMP})
    events = milestones(handoff, PHASES)
    assert [s for s, _ in events] == [10, 10, 10, 30, 30]
    assert any("frozen" in text for s, text in events if s == 30)
    line = summary_line(handoff)
    assert "\n" not in line
    assert line == ("handoff: ffn LoRA 1->0 cosine over [10,30] then freeze; base_ffn lr x0.1->x1 over [10,30]; "
                    "export: remove_zero_scale=True, merge=False")
