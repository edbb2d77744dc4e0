"""StrategyRuntime driven by a plain torch loop: phases, handoff, LR ramp, export, reload, validation."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import small_model

from molf.model.strategies import (LoRALinear, StrategyLoRAConfig, apply_strategy, rebuild_strategy_structure,
                                   validate_strategy)
from molf.train.handoff import fade_scale

IDS = torch.randint(0, 128, (4, 9), generator=torch.Generator().manual_seed(1))
BASE_LR = {"router": 1e-2, "lora": 1e-2, "attn_lora": 1e-2, "base_ffn": 1e-3}


def _optimizer(runtime):
    groups = [{"params": ps, "kind": kind, "lr": BASE_LR[kind]} for kind, ps in runtime.param_groups().items()]
    return torch.optim.AdamW(groups, weight_decay=0.0)


def train(model, runtime, steps: range, optimizer=None):
    """The trainer's side of the contract, by hand; returns the optimizer and the steps that rebuilt it."""
    rebuilt = []
    optimizer = optimizer or _optimizer(runtime)
    for step in steps:
        if runtime.on_step_begin(model, step):
            optimizer = _optimizer(runtime)
            rebuilt.append(step)
        multipliers = runtime.lr_multipliers(step)
        for group in optimizer.param_groups:
            group["lr"] = BASE_LR[group["kind"]] * multipliers.get(group["kind"], 1.0)
        logits = model(IDS).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1))
        extra, _ = runtime.extra_loss(model)
        (loss if extra is None else loss + extra).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer, rebuilt


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(model, before):
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def _names(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("mode", ["mixture_lora", "moe_expert_lora"])
def test_only_the_active_phase_trains(mode):
    model = small_model("qwen2")
    cfg = StrategyLoRAConfig(num_experts=2, expert_top_k=1, lora_rank=2, lora_dropout=0.0,
                             phases=[{"step": 0, "trainable": ["router"]},
                                     {"step": 3, "trainable": ["lora", "base_ffn"]}])
    runtime = apply_strategy(model, cfg, mode)
    router, lora, base = (_names(model, runtime.groups[k]) for k in ("router", "lora", "base_ffn"))
    assert router and lora and base
    before = _snapshot(model)
    optimizer, rebuilt = train(model, runtime, range(0, 3))
    assert rebuilt == [] and _changed(model, before) == router
    before = _snapshot(model)
    _, rebuilt = train(model, runtime, range(3, 6), optimizer)
    assert rebuilt == [3]
    changed = _changed(model, before)
    assert changed <= lora | base and base <= changed
    assert {n for n in lora if n.endswith("lora_B")} <= changed


def test_dense_phase_with_attention_only():
    model = small_model("llama")
    cfg = StrategyLoRAConfig(attn_lora=True, lora_rank=2, lora_dropout=0.0,
                             phases=[{"step": 0, "trainable": ["attn_lora"]}, {"step": 2, "trainable": ["lora"]}])
    runtime = apply_strategy(model, cfg, "dense_lora")
    before = _snapshot(model)
    optimizer, _ = train(model, runtime, range(0, 2))
    assert _changed(model, before) == _names(model, runtime.groups["attn_lora"])
    before = _snapshot(model)
    _, rebuilt = train(model, runtime, range(2, 4), optimizer)
    assert rebuilt == [2] and _changed(model, before) == _names(model, runtime.groups["lora"])


HANDOFF_CFG = dict(
    num_experts=2, expert_top_k=1, lora_rank=2, lora_dropout=0.0, attn_lora=True,
    phases=[{"step": 0, "trainable": ["router", "lora", "attn_lora"]},
            {"step": 4, "trainable": ["lora", "attn_lora", "base_ffn"]}],
    handoff={"fade": [{"target": "ffn", "start_step": 4, "duration": 4, "end_scale": 0.0, "curve": "linear",
                       "end_action": "freeze"},
                      {"target": "attn", "start_step": 4, "duration": 4, "end_scale": 0.5, "curve": "cosine"}],
             "lr_ramp": {"start_step": 4, "end_step": 8, "start_multiplier": 0.1, "end_multiplier": 1.0}})


def _scales(model, role):
    return {m.lora_scale for m in model.modules() if isinstance(m, LoRALinear) and m.role == role}


def test_handoff_fades_freezes_and_ramps(caplog):
    model = small_model("qwen2")
    runtime = apply_strategy(model, StrategyLoRAConfig(**HANDOFF_CFG), "moe_expert_lora")
    assert "ffn LoRA 1->0 linear over [4,8] then freeze" in runtime.summary()
    rebuilt = []
    with caplog.at_level(logging.INFO, logger="molf.model.strategies.runtime"):
        for step in range(10):
            if runtime.on_step_begin(model, step):
                rebuilt.append(step)
            assert _scales(model, "ffn") == {fade_scale(step, 4, 4, 0.0, "linear")}
            assert _scales(model, "attn") == {fade_scale(step, 4, 4, 0.5, "cosine")}
            if step == 6:  # halfway: linear 1 -> 0 gives 0.5, cosine 1 -> 0.5 gives 0.75
                assert _scales(model, "ffn") == {0.5} and _scales(model, "attn").pop() == pytest.approx(0.75)
            items = runtime.log_items(step)
            assert items["handoff_ffn_lora_scale"] == fade_scale(step, 4, 4, 0.0, "linear")
            assert items["base_ffn_lr_multiplier"] == runtime.lr_multipliers(step)["base_ffn"]
    assert _scales(model, "ffn") == {0.0} and rebuilt == [4, 8]
    assert runtime.lr_multipliers(6) == {"base_ffn": pytest.approx(0.55)}
    assert runtime.active == {"attn_lora", "base_ffn"}  # ffn LoRA frozen at the fade's end
    assert not any(p.requires_grad for p in runtime.groups["lora"])
    assert any("ffn LoRA fade ends" in r.getMessage() for r in caplog.records)


def _trained_then_exported(steps: int):
    """The HANDOFF_CFG model trained ``steps`` steps, its logits before export, then exported."""
    model = small_model("qwen2")
    cfg = StrategyLoRAConfig(**HANDOFF_CFG)
    runtime = apply_strategy(model, cfg, "moe_expert_lora")
    train(model, runtime, range(steps))
    model.eval()
    expected = model(IDS).logits
    runtime.export(model)
    return model, cfg, runtime, expected


def test_handoff_training_and_export_then_reload(tmp_path):
    model, cfg, _, expected = _trained_then_exported(10)
    assert _scales(model, "ffn") == set()  # zero-scale adapters removed
    assert _scales(model, "attn") == {0.5}  # kept (merge is off)
    torch.testing.assert_close(model(IDS).logits, expected)
    fresh = rebuild_strategy_structure(small_model("qwen2"), cfg, "moe_expert_lora")
    fresh.load_state_dict(model.state_dict())  # strict: same structure
    assert _scales(fresh, "attn") == {0.5}  # the attention fade's end scale is replayed
    torch.testing.assert_close(fresh.eval()(IDS).logits, expected)


def test_handoff_export_merge():
    cfg = StrategyLoRAConfig(**{**HANDOFF_CFG, "handoff": {**HANDOFF_CFG["handoff"],
                                                           "export": {"remove_zero_scale": False, "merge": True}}})
    model = small_model("qwen2")
    runtime = apply_strategy(model, cfg, "moe_expert_lora")
    train(model, runtime, range(10))
    model.eval()
    expected = model(IDS).logits
    runtime.export(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=1e-5)
    fresh = rebuild_strategy_structure(small_model("qwen2"), cfg, "moe_expert_lora")
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval()(IDS).logits, expected, atol=1e-5, rtol=1e-5)


def test_mixture_checkpoint_reloads_into_rebuilt_structure():
    cfg = StrategyLoRAConfig(num_experts=3, expert_top_k=2, lora_rank=2, lora_dropout=0.0)
    model = small_model("llama")
    runtime = apply_strategy(model, cfg, "mixture_lora")
    train(model, runtime, range(3))
    model.eval()
    expected = model(IDS).logits
    state = runtime.export(model).state_dict()
    fresh = rebuild_strategy_structure(small_model("llama"), cfg, "mixture_lora")
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.eval()(IDS).logits, expected)


def test_dense_export_is_a_plain_model():
    cfg = StrategyLoRAConfig(lora_rank=2, lora_dropout=0.0, attn_lora=True)
    model = small_model("gemma3")
    runtime = apply_strategy(model, cfg, "dense_lora")
    train(model, runtime, range(3))
    model.eval()
    expected = model(IDS).logits
    unmerged = {k: v.clone() for k, v in model.state_dict().items()}
    runtime.export(model)
    fresh = small_model("gemma3")
    assert rebuild_strategy_structure(fresh, cfg, "dense_lora") is fresh
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval()(IDS).logits, expected, atol=1e-5, rtol=1e-5)
    midrun = rebuild_strategy_structure(small_model("gemma3"), cfg, "dense_lora", exported=False)
    midrun.load_state_dict(unmerged)
    torch.testing.assert_close(midrun.eval()(IDS).logits, expected)


def test_parameter_counts():
    model = small_model("qwen2")
    runtime = apply_strategy(model, StrategyLoRAConfig(num_experts=2, expert_top_k=1, lora_rank=2), "moe_expert_lora")
    counts = runtime.parameter_counts()
    assert counts["router"] == 2 * 2 * 32  # 2 blocks x (E=2 x H=32)
    assert counts["lora"] == 2 * 2 * 2 * (32 + 64) * 3  # blocks x copies x r x (in + out) x 3 linears
    assert counts["trainable"] == counts["router"] + counts["lora"]


def _cfg(**kw):
    return StrategyLoRAConfig(**{**HANDOFF_CFG, **kw})


@pytest.mark.parametrize("mode, cfg, match", [
    ("fft", _cfg(), "not a LoRA strategy"),
    ("mixture_lora", _cfg(), "only for mode moe_expert_lora"),
    ("moe_expert_lora", _cfg(phases=[{"step": 0, "trainable": ["router", "lora", "attn_lora"]}]), "unfreezes base_ffn"),
    ("moe_expert_lora", _cfg(attn_lora=False, phases=[{"step": 0, "trainable": ["router", "lora"]},
                                                      {"step": 4, "trainable": ["base_ffn"]}]), "attention"),
    ("moe_expert_lora", _cfg(handoff={"fade": {"start_step": 2, "duration": 2}}), "before base_ffn is unfrozen"),
    ("moe_expert_lora", _cfg(handoff={"fade": {"start_step": 4, "duration": 2, "end_scale": 2}}), r"\[0, 1\]"),
    ("moe_expert_lora", _cfg(handoff={"fade": {"start_step": 4, "duration": 2, "curve": "step"}}), "curve"),
    ("moe_expert_lora", _cfg(handoff={"fade": {"start_step": 4, "duration": 2, "end_action": "x"}}), "end_action"),
])
def test_validate_strategy_rules(mode, cfg, match):
    with pytest.raises(ValueError, match=match):
        validate_strategy(cfg, mode)


def test_validate_strategy_with_total_steps():
    cfg = _cfg()
    assert validate_strategy(cfg, "moe_expert_lora", total_steps=100) == []
    with pytest.raises(ValueError, match="last optimizer step"):
        validate_strategy(cfg, "moe_expert_lora", total_steps=5)
    shifted = _cfg(handoff={**HANDOFF_CFG["handoff"], "lr_ramp": {"start_step": 5, "end_step": 8}})
    assert any("different windows" in w for w in validate_strategy(shifted, "moe_expert_lora", 100))
    no_router = _cfg(handoff=None, phases=[{"step": 0, "trainable": ["lora"]}])
    assert any("router" in w for w in validate_strategy(no_router, "mixture_lora"))
    assert any("has no router" in w for w in validate_strategy(
        StrategyLoRAConfig(phases=[{"step": 0, "trainable": ["router", "lora"]}]), "dense_lora"))


@pytest.mark.parametrize("family, mode", [("qwen2", "moe_expert_lora"), ("llama", "mixture_lora")])
def test_save_pretrained_then_load_strategy_model(tmp_path, family, mode):
    from molf.model.strategies import load_strategy_model

    cfg = StrategyLoRAConfig(num_experts=2, expert_top_k=1, lora_rank=2, lora_dropout=0.0, attn_lora=True)
    model = small_model(family)  # qwen2 ties lm_head to the embeddings: save_pretrained drops one copy
    runtime = apply_strategy(model, cfg, mode)
    train(model, runtime, range(2))
    model.eval()
    expected = model(IDS).logits
    runtime.export(model).save_pretrained(tmp_path)
    loaded = load_strategy_model(tmp_path, cfg, mode)
    torch.testing.assert_close(loaded(IDS).logits, expected)
    with pytest.raises(ValueError, match="does not match"):
        load_strategy_model(tmp_path, StrategyLoRAConfig(num_experts=3, expert_top_k=1, lora_rank=2), mode)


def test_ignored_knobs_warn():
    dense = StrategyLoRAConfig(num_experts=8, expert_top_k=1, attn_targets=["q_proj"])
    assert validate_strategy(dense, "dense_lora") == [
        "num_experts is ignored in dense_lora", "expert_top_k is ignored in dense_lora",
        "attn_targets is ignored in dense_lora without attn_lora: true"]
    assert validate_strategy(StrategyLoRAConfig(num_experts=8, expert_top_k=1), "mixture_lora") == []


def test_a_fade_cut_short_by_the_end_of_training_reloads_with_its_last_scales(tmp_path):
    """Training stops at step index 6 (fades end at 8): the ffn LoRA is at scale 0.5, not 0, so export
    keeps it; the scales saved with the checkpoint make the reload build the same model."""
    from molf.model.strategies.structure import read_handoff_scales, save_handoff_scales

    model, cfg, runtime, expected = _trained_then_exported(7)
    assert runtime.export_scales == {"ffn": 0.5, "attn": pytest.approx(fade_scale(6, 4, 4, 0.5, "cosine"))}
    assert _scales(model, "ffn") == {0.5}  # not zero: kept
    save_handoff_scales(tmp_path, runtime.export_scales)
    fresh = rebuild_strategy_structure(small_model("qwen2"), cfg, "moe_expert_lora",
                                       lora_scales=read_handoff_scales(tmp_path))
    fresh.load_state_dict(model.state_dict())  # strict: the ffn adapters are there too
    torch.testing.assert_close(fresh.eval()(IDS).logits, expected)
