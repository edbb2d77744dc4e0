"""moe_expert_lora: the FFN as an MoE of LoRA-adapted copies; identity at init, sparse dispatch, freezing."""

from __future__ import annotations

import pytest
import torch
from conftest import small_model
from test_strategies_dense import tiny_mixtral

from molf.model.strategies import LoRALinear, MoEExpertFFN, StrategyLoRAConfig, apply_strategy

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama", "gemma3"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_equals_the_original_model_at_init(family, top_k):
    model = small_model(family).eval()
    expected = small_model(family).eval()(IDS).logits
    apply_strategy(model, StrategyLoRAConfig(num_experts=3, expert_top_k=top_k, lora_rank=2), "moe_expert_lora")
    moes = [m for m in model.modules() if isinstance(m, MoEExpertFFN)]
    assert len(moes) == 2 and all(len(m.experts) == 3 for m in moes)
    torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=1e-5)


def test_moe_output_is_the_gated_sum_of_selected_copies():
    model = small_model("llama")
    apply_strategy(model, StrategyLoRAConfig(num_experts=3, expert_top_k=2, lora_rank=2), "moe_expert_lora")
    moe = model.model.layers[0].mlp.eval()  # no LoRA dropout
    with torch.no_grad():
        for p in moe.experts.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # make the copies differ
    x = torch.randn(2, 5, 32)
    tokens = x.reshape(-1, 32)
    probs = (tokens @ moe.router.weight.T).softmax(-1)
    top_p, top_i = probs.topk(2, -1)
    top_p = top_p / top_p.sum(-1, keepdim=True)
    outs = torch.stack([expert(tokens) for expert in moe.experts], 1)  # (T, E, H)
    expected = (outs.gather(1, top_i[..., None].expand(-1, -1, 32)) * top_p[..., None]).sum(1)
    torch.testing.assert_close(moe(x), expected.reshape(2, 5, 32), atol=1e-5, rtol=1e-5)


def test_unselected_copies_are_not_executed():
    model = small_model("qwen2")
    apply_strategy(model, StrategyLoRAConfig(num_experts=4, expert_top_k=1, lora_rank=2), "moe_expert_lora")
    moe = model.model.layers[0].mlp
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[1] = 1.0
    calls = []
    for i, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda mod, inp, out, i=i: calls.append(i))
    moe(torch.randn(3, 4, 32).abs())
    assert calls == [1]


def test_copies_carry_lora_and_start_frozen():
    model = small_model("qwen2")
    runtime = apply_strategy(model, StrategyLoRAConfig(num_experts=2, expert_top_k=1, lora_rank=2, attn_lora=True),
                             "moe_expert_lora")
    moe = model.model.layers[1].mlp
    for expert in moe.experts:
        assert all(isinstance(getattr(expert, n), LoRALinear) for n in ("gate_proj", "up_proj", "down_proj"))
        assert not any(p.requires_grad for n, p in expert.named_parameters() if "lora_" not in n)
        assert all(p.requires_grad for n, p in expert.named_parameters() if "lora_" in n)
    base_ids = {id(p) for e in moe.experts for n, p in e.named_parameters() if "lora_" not in n}
    assert base_ids <= {id(p) for p in runtime.groups["base_ffn"]}
    assert runtime.active == {"router", "lora", "attn_lora"}


def test_fused_expert_models_are_refused():
    with pytest.raises(ValueError, match="moe_expert_lora needs nn.Linear FFN targets"):
        apply_strategy(tiny_mixtral(), StrategyLoRAConfig(num_experts=2, expert_top_k=1), "moe_expert_lora")
    with pytest.raises(ValueError, match="mixture_lora found no nn.Linear FFN targets"):
        apply_strategy(tiny_mixtral(), StrategyLoRAConfig(num_experts=2, expert_top_k=1), "mixture_lora")
