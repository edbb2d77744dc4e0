"""dense_lora: LoRALinear, block discovery across model families, scope, merge into a plain model."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import small_model
from torch import nn
from transformers import AutoModelForCausalLM, MixtralConfig

from molf.model.strategies import LoRALinear, StrategyLoRAConfig, apply_strategy, merge_strategy
from molf.model.strategies.blocks import find_blocks
from molf.model.strategies.fused_lora import ExpertsLoRADelta

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))


def tiny_mixtral(seed: int = 0):
    config = MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def build(family: str, **overrides):
    return tiny_mixtral() if family == "mixtral" else small_model(family, **overrides)


def _perturb_b(model, seed: int = 2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def test_lora_linear_delta_and_scaling():
    base = nn.Linear(6, 5)
    rs = LoRALinear(base, r=4, lora_alpha=8, use_rslora=True)
    assert rs.scaling == pytest.approx(8 / math.sqrt(4))
    assert LoRALinear(nn.Linear(6, 5), r=4, lora_alpha=8, use_rslora=False).scaling == pytest.approx(2.0)
    x = torch.randn(3, 6)
    torch.testing.assert_close(rs(x), base(x))  # B = 0 at init
    nn.init.normal_(rs.lora_B)
    expected = base(x) + rs.scaling * x @ rs.lora_A.T @ rs.lora_B.T
    torch.testing.assert_close(rs(x), expected)
    rs.lora_scale = 0.0
    torch.testing.assert_close(rs(x), base(x))
    with pytest.raises(ValueError, match="rank must be positive"):
        LoRALinear(nn.Linear(2, 2), r=0, lora_alpha=1)


def test_merge_uses_current_scale():
    base = nn.Linear(6, 5)
    module = LoRALinear(base, r=2, lora_alpha=2, use_rslora=False)
    nn.init.normal_(module.lora_B)
    module.lora_scale = 0.5
    x = torch.randn(4, 6)
    expected = module(x)
    torch.testing.assert_close(module.merge()(x), expected)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama", "gemma3", "mixtral"])
def test_dense_lora_on_every_family(family):
    model = build(family).eval()
    reference = build(family).eval()
    base_logits = reference(IDS).logits
    runtime = apply_strategy(model, StrategyLoRAConfig(attn_lora=True, lora_rank=4, lora_dropout=0.0), "dense_lora")
    torch.testing.assert_close(model(IDS).logits, base_logits)  # B = 0: exactly the base model
    attn = [m for m in model.modules() if isinstance(m, LoRALinear) and m.role == "attn"]
    ffn_linear = [m for m in model.modules() if isinstance(m, LoRALinear) and m.role == "ffn"]
    fused = [m for m in model.modules() if isinstance(m, ExpertsLoRADelta)]
    assert len(attn) == 2 * 2  # q_proj, v_proj in 2 blocks
    assert len(ffn_linear) + len(fused) == 3 * 2  # gate, up, down in 2 blocks
    assert (len(fused) > 0) == (family == "mixtral")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in runtime.groups["lora"] + runtime.groups["attn_lora"]}
    _perturb_b(model)
    adapted = model(IDS).logits
    assert (adapted - base_logits).abs().max() > 1e-3
    merge_strategy(model)
    assert not any(isinstance(m, (LoRALinear, ExpertsLoRADelta)) for m in model.modules())
    assert set(model.state_dict()) == set(reference.state_dict())  # a plain transformers model again
    torch.testing.assert_close(model(IDS).logits, adapted, atol=1e-5, rtol=1e-5)


def test_scope_and_targets():
    model = small_model("llama", num_hidden_layers=4)
    cfg = StrategyLoRAConfig(start_layer=1, num_layers=2, ffn_targets=["down_proj"], lora_rank=2)
    apply_strategy(model, cfg, "dense_lora")
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    all_from_2 = small_model("llama", num_hidden_layers=4)
    apply_strategy(all_from_2, StrategyLoRAConfig(start_layer=2, lora_rank=2), "dense_lora")
    layers = {n.split(".")[2] for n, m in all_from_2.named_modules() if isinstance(m, LoRALinear)}
    assert layers == {"2", "3"}


def test_lora_settings_come_from_lora_config():
    model = small_model("qwen2")
    apply_strategy(model, StrategyLoRAConfig(lora_rank=8, lora_alpha=4.0, use_rslora=False, lora_dropout=0.2),
                   "dense_lora")
    module = model.model.layers[0].mlp.up_proj
    assert (module.r, module.scaling, module.lora_dropout.p) == (8, 0.5, 0.2)


@pytest.mark.parametrize("cfg, match", [
    (dict(start_layer=5), "start_layer=5"),
    (dict(ffn_targets=["fc1"]), "no FFN targets"),
    (dict(attn_lora=True, attn_targets=["qkv"]), "no attention targets"),
])
def test_bad_scope_raises(cfg, match):
    with pytest.raises(ValueError, match=match):
        apply_strategy(small_model("qwen2"), StrategyLoRAConfig(**cfg), "dense_lora")


def test_block_discovery_names():
    blocks = find_blocks(small_model("gemma3"))
    assert [b.mlp_name for b in blocks] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert blocks[1].attn_name == "model.layers.1.self_attn"
    with pytest.raises(ValueError, match="could not find the decoder blocks"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))
