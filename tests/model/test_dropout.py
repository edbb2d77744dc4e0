"""``LoRADropout``: the counter-based CPU dropout of the LoRA inputs (``molf.model.dropout``)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from molf.model import dropout as dropout_mod
from molf.model.dropout import LoRADropout, counter_dropout
from molf.model.molf_linear import MoLFLinear
from molf.optim import native


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_drops_a_fraction_p_and_scales_the_rest(p):
    x = _x(1000, 1000) + 10.0  # no zeros in the input
    torch.manual_seed(0)
    y = counter_dropout(x, p)
    dropped = y == 0
    assert abs(dropped.float().mean().item() - p) < 2e-3
    torch.testing.assert_close(y[~dropped], x[~dropped] * (1.0 / (1.0 - p)), rtol=1e-6, atol=0)


def test_masks_are_independent_across_neighbours_and_calls():
    p, x = 0.3, torch.ones(1 << 20)
    torch.manual_seed(1)
    first, second = counter_dropout(x, p) == 0, counter_dropout(x, p) == 0
    assert not torch.equal(first, second)
    both_calls = (first & second).float().mean().item()
    neighbours = (first[1:] & first[:-1]).float().mean().item()
    block_apart = (first[native.BLOCK:] & first[:-native.BLOCK]).float().mean().item()
    for joint in (both_calls, neighbours, block_apart):
        assert abs(joint - p * p) < 3e-3


def test_backward_applies_the_forward_mask():
    x = (_x(37, 300) + 10.0).requires_grad_()
    upstream = _x(37, 300, seed=1)
    torch.manual_seed(2)
    y = counter_dropout(x, 0.2)
    y.backward(upstream)
    kept = (y != 0).float()
    torch.testing.assert_close(x.grad, upstream * kept / 0.8, rtol=1e-6, atol=0)


def test_seeded_by_torch_and_independent_of_the_thread_count():
    x = _x(3, native.BLOCK + 17)
    threads = torch.get_num_threads()
    try:
        outputs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(5)
            outputs.append(counter_dropout(x, 0.1))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outputs[0], outputs[1])


def test_non_contiguous_input_and_identity_when_off():
    x = _x(64, 48).t().requires_grad_()
    y = counter_dropout(x, 0.25)
    assert y.shape == x.shape and y.is_contiguous()
    y.sum().backward()
    assert torch.equal(x.grad == 0, y == 0)
    assert counter_dropout(x, 0.25, training=False) is x and counter_dropout(x, 0.0) is x
    module = LoRADropout(0.25).eval()
    assert module(x) is x and repr(module) == "LoRADropout(p=0.25, inplace=False)"


def test_nan_in_a_dropped_position_stays_nan_like_torch():
    x = torch.full((4096,), float("nan"))
    assert torch.isnan(counter_dropout(x, 0.5)).all()


def test_falls_back_to_torch_dropout_off_the_native_path(monkeypatch):
    x = _x(50, 40, seed=3)
    torch.manual_seed(7)
    expected = F.dropout(x, 0.3, True)
    torch.manual_seed(7)
    expected_fp64 = F.dropout(x.double(), 0.3, True)
    torch.manual_seed(7)
    assert torch.equal(counter_dropout(x.double(), 0.3), expected_fp64)  # fp64 is not native
    monkeypatch.setattr(native, "available", lambda: False)
    torch.manual_seed(7)
    assert torch.equal(counter_dropout(x, 0.3), expected)
    assert dropout_mod._native_ok(x) is False


def test_activation_checkpointing_replays_the_same_mask():
    base = torch.nn.Linear(32, 24)
    module = MoLFLinear(base, [4], [8.0], dropout=0.3)
    torch.nn.init.normal_(module.lora_B[0])
    x = _x(6, 32, seed=4).requires_grad_()

    def grads(use_checkpoint):
        module.zero_grad()
        x.grad = None
        torch.manual_seed(11)
        out = checkpoint(module, x, use_reentrant=False) if use_checkpoint else module(x)
        out.square().sum().backward()
        return [x.grad.clone(), module.lora_A[0].grad.clone(), module.weight.grad.clone()]

    plain, replayed = grads(False), grads(True)
    for a, b in zip(plain, replayed):
        assert torch.equal(a, b)


def test_molf_linear_uses_the_native_dropout_on_cpu():
    module = MoLFLinear(torch.nn.Linear(16, 8), [4], [8.0], dropout=0.05)
    assert isinstance(module.lora_dropout, LoRADropout) and module.lora_dropout.p == 0.05
    assert native.available()  # the test machines have a C compiler; the path under test is the native one


def test_p_one_drops_everything_like_torch():
    x = torch.randn(4, 8, requires_grad=True)
    out = counter_dropout(x, 1.0)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
