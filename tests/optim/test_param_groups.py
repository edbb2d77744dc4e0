from dataclasses import dataclass

import pytest
import torch
from conftest import small_model

from molf.model import LoRAConfig, MoLFConfig, wrap_model_with_molf
from molf.optim import GroupRule, OptimConfig, build_param_groups

CFG = OptimConfig(learning_rate=1e-4, lora_learning_rate=5e-4, weight_decay=0.1, lora_weight_decay=0.01)


@dataclass
class WrapConfig(MoLFConfig, LoRAConfig):
    pass


def _by_kind(groups):
    return {g["kind"]: g for g in groups}


def test_molf_groups_by_expert_kind(tiny_qwen2):
    wrap_model_with_molf(tiny_qwen2, WrapConfig(molf_lora_ranks=[4]))
    groups = _by_kind(build_param_groups(tiny_qwen2, CFG))
    assert list(groups) == ["fft", "lora", "other_no_decay", "other"]
    assert "model.layers.0.self_attn.q_proj.bias" in groups["fft"]["names"]  # the bias belongs to its FFT expert
    assert all(n.endswith((".lora_A.0", ".lora_B.0")) for n in groups["lora"]["names"])
    assert groups["other"]["names"] == ["model.embed_tokens.weight"]
    assert all(n.endswith("norm.weight") for n in groups["other_no_decay"]["names"])
    assert (groups["fft"]["lr"], groups["fft"]["weight_decay"]) == (1e-4, 0.1)
    assert (groups["lora"]["lr"], groups["lora"]["weight_decay"]) == (5e-4, 0.01)
    assert (groups["other_no_decay"]["lr"], groups["other_no_decay"]["weight_decay"]) == (1e-4, 0.0)
    for g in groups.values():
        assert len(g["params"]) == len(g["names"])
        assert all(not isinstance(v, torch.Tensor) for k, v in g.items() if k != "params")


def test_every_trainable_parameter_in_exactly_one_group(tiny_llama):
    wrap_model_with_molf(tiny_llama, WrapConfig(molf_lora_ranks=[4, 8]))
    names = [n for g in build_param_groups(tiny_llama, CFG) for n in g["names"]]
    assert sorted(names) == sorted(n for n, p in tiny_llama.named_parameters() if p.requires_grad)


def test_molf_e_has_no_fft_group(tiny_qwen2):
    wrap_model_with_molf(tiny_qwen2, WrapConfig(molf_fft=False, molf_freeze_non_linear=True))
    assert [g["kind"] for g in build_param_groups(tiny_qwen2, CFG)] == ["lora"]


def test_plain_model_gets_other_groups(tiny_llama):
    assert [g["kind"] for g in build_param_groups(tiny_llama, CFG)] == ["other_no_decay", "other"]


def test_custom_rule_matching_nothing_raises(tiny_llama):
    rules = [GroupRule("router", lambda info: False, "learning_rate", None),
             GroupRule("other", lambda info: True, "learning_rate", "weight_decay")]
    with pytest.raises(ValueError, match="router"):
        build_param_groups(tiny_llama, CFG, rules)


def test_unclaimed_parameter_raises(tiny_llama):
    rules = [GroupRule("matrices", lambda info: info.param.ndim == 2, "learning_rate", "weight_decay")]
    with pytest.raises(ValueError, match="matches no param-group rule"):
        build_param_groups(tiny_llama, CFG, rules)


def test_no_trainable_parameter_raises():
    model = small_model("llama")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        build_param_groups(model, CFG)
