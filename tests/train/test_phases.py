"""Phase plans: parsing rules, the active phase at a step, warnings."""

from __future__ import annotations

import pytest

from molf.train.phases import (Phase, default_phases, describe_phases, first_step_training, parse_phases,
                               phase_index_at, phase_warnings)

PLAN = [{"step": 0, "trainable": ["router", "lora"]}, {"step": 10, "trainable": ["lora", "base_ffn"]},
        {"step": 25, "trainable": "base_ffn"}]


def test_parse_and_index():
    phases = parse_phases(PLAN, "moe_expert_lora", attn_lora=False)
    assert phases[2] == Phase(25, ("base_ffn",))
    assert [phase_index_at(phases, s) for s in (0, 9, 10, 24, 25, 1000)] == [0, 0, 1, 1, 2, 2]
    assert first_step_training(phases, "base_ffn") == 10
    assert first_step_training(phases, "attn_lora") is None
    assert describe_phases(phases) == "phases: 0:[router,lora] -> 10:[lora,base_ffn] -> 25:[base_ffn]"


def test_defaults_train_what_the_strategy_adds():
    assert default_phases("dense_lora", attn_lora=True) == [Phase(0, ("lora", "attn_lora"))]
    assert default_phases("mixture_lora", attn_lora=False) == [Phase(0, ("router", "lora"))]
    assert parse_phases(None, "moe_expert_lora", attn_lora=False) == [Phase(0, ("router", "lora"))]


@pytest.mark.parametrize("raw, match", [
    ([], "non-empty"),
    ([{"step": 0}], "exactly the keys"),
    ([{"step": 0, "trainable": ["lora"], "lr": 1}], "exactly the keys"),
    ([{"step": -1, "trainable": ["lora"]}], "non-negative"),
    ([{"step": 1.5, "trainable": ["lora"]}], "non-negative"),
    ([{"step": 0, "trainable": ["embeddings"]}], "trainable must list"),
    ([{"step": 0, "trainable": []}], "trainable must list"),
    ([{"step": 5, "trainable": ["lora"]}], "first phase must start at step 0"),
    ([{"step": 0, "trainable": ["lora"]}, {"step": 0, "trainable": ["router"]}], "strictly increasing"),
    ([{"step": 0, "trainable": ["attn_lora"]}], "attention LoRA is off"),
])
def test_bad_phases_raise(raw, match):
    with pytest.raises(ValueError, match=match):
        parse_phases(raw, "mixture_lora", attn_lora=False)


def test_warnings():
    no_router = parse_phases([{"step": 0, "trainable": ["lora"]}], "mixture_lora", False)
    assert any("no phase trains the router" in w for w in phase_warnings(no_router, "mixture_lora", None))
    dense_router = parse_phases([{"step": 0, "trainable": ["router", "lora"]}], "dense_lora", False)
    assert any("has no router" in w for w in phase_warnings(dense_router, "dense_lora", None))
    fine = parse_phases(PLAN, "moe_expert_lora", False)
    assert phase_warnings(fine, "moe_expert_lora", 100) == []
    assert any("never run" in w for w in phase_warnings(fine, "moe_expert_lora", 20))
