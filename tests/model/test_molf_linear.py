import math

import pytest
import torch
from torch import nn

from molf.model.molf_linear import MoLFLinear


def _wrapped(bias=True, ranks=(4, 8), alphas=(8.0, 16.0), **kwargs):
    base = nn.Linear(6, 5, bias=bias)
    return base, MoLFLinear(base, list(ranks), list(alphas), **kwargs)


@pytest.mark.parametrize("bias", [True, False])
def test_init_output_equals_base(bias):
    base, module = _wrapped(bias=bias)
    x = torch.randn(3, 2, 6)
    expected = base(x)
    torch.testing.assert_close(module(x), expected, rtol=0, atol=0)
    assert all(torch.count_nonzero(b) == 0 for b in module.lora_B)
    assert all(torch.count_nonzero(a) > 0 for a in module.lora_A)


def test_scaling_rslora_and_plain():
    _, rs = _wrapped(use_rslora=True)
    _, plain = _wrapped(use_rslora=False)
    assert rs.scaling == pytest.approx([8 / math.sqrt(4), 16 / math.sqrt(8)])
    assert plain.scaling == pytest.approx([8 / 4, 16 / 8])


def test_forward_adds_scaled_deltas():
    base, module = _wrapped(use_rslora=False)
    for b in module.lora_B:
        nn.init.normal_(b)
    x = torch.randn(4, 6)
    expected = base(x) + sum(s * x @ a.T @ b.T for a, b, s in zip(module.lora_A, module.lora_B, module.scaling))
    torch.testing.assert_close(module(x), expected)


def test_dropout_mask_is_shared_by_all_lora_experts():
    _, module = _wrapped(dropout=0.5)
    calls = []
    module.lora_dropout.register_forward_hook(lambda *args: calls.append(1))
    module.train()
    module(torch.randn(2, 6))
    assert len(calls) == 1


def test_expert_bookkeeping_with_fft_expert():
    base, module = _wrapped(ranks=(32, 128), alphas=(1.0, 1.0))
    experts = module.expert_params()
    assert experts[0][0] is base.weight and experts[0][1] is base.bias
    assert [e[0] is a and e[1] is b for e, a, b in zip(experts[1:], module.lora_A, module.lora_B)] == [True, True]
    assert module.expert_kinds() == ["fft", "lora", "lora"]
    assert module.expert_names() == ["fft", "lora0_r32", "lora1_r128"]


def test_freeze_base_has_no_fft_expert():
    base, module = _wrapped(freeze_base=True)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert module.expert_kinds() == ["lora", "lora"]
    assert module.expert_names() == ["lora0_r4", "lora1_r8"]
    assert all(p.requires_grad for e in module.expert_params() for p in e)


def test_state_dict_keys_keep_base_names():
    _, module = _wrapped()
    assert sorted(module.state_dict()) == ["bias", "lora_A.0", "lora_A.1", "lora_B.0", "lora_B.1", "weight"]


def test_merged_weight_matches_forward_in_eval():
    _, module = _wrapped(dropout=0.3)
    for b in module.lora_B:
        nn.init.normal_(b)
    module.eval()
    x = torch.randn(7, 6)
    torch.testing.assert_close(nn.functional.linear(x, module.merged_weight(), module.bias), module(x))


def test_merge_refuses_non_finite():
    base, module = _wrapped()
    with torch.no_grad():
        module.lora_B[0].fill_(float("inf"))
    before = base.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        module.unwrap()
    assert torch.equal(base.weight, before)


def test_unwrap_returns_original_module_with_merged_weight_and_flags():
    base, module = _wrapped(freeze_base=True)
    with torch.no_grad():
        module.lora_B[1].normal_()
    merged = module.merged_weight()
    restored = module.unwrap()
    assert restored is base
    assert torch.equal(restored.weight, merged)
    assert restored.weight.requires_grad and restored.bias.requires_grad


@pytest.mark.parametrize("ranks, alphas", [([], []), ([0], [1.0]), ([4], [1.0, 2.0])])
def test_bad_arguments_raise(ranks, alphas):
    with pytest.raises(ValueError):
        MoLFLinear(nn.Linear(3, 3), ranks, alphas)
