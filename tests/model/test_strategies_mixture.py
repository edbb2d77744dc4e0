"""mixture_lora: routed LoRA experts, sparse dispatch, router losses, a toy task the router must solve."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import small_model
from torch import nn

from molf.model.strategies import MixtureLoRALinear, StrategyLoRAConfig, apply_strategy, validate_strategy
from molf.model.strategies.routing import TopKRouter


def _module(num_experts=4, top_k=2, d=8, r=4):
    return MixtureLoRALinear(nn.Linear(d, d), num_experts, top_k, r=r, lora_alpha=r, use_rslora=False)


def test_forward_matches_dense_reference():
    module = _module()
    x = torch.randn(3, 5, 8)  # (B, T, in)
    tokens = x.reshape(-1, 8)
    probs = F.linear(tokens, module.router.weight).softmax(-1)  # (T, E)
    top_p, top_i = probs.topk(2, dim=-1)
    gates = torch.zeros_like(probs).scatter(1, top_i, top_p)  # (T, E), zero off the top-k
    deltas = torch.einsum("eri,ti->ter", module.lora_A, tokens)
    deltas = torch.einsum("eor,ter->teo", module.lora_B, deltas) * module.scaling  # (T, E, out)
    expected = module.base(tokens) + (gates[..., None] * deltas).sum(1)
    torch.testing.assert_close(module(x), expected.reshape(3, 5, 8), atol=1e-5, rtol=1e-5)


def test_only_selected_experts_run_and_get_gradients():
    module = _module(num_experts=4, top_k=1)
    with torch.no_grad():
        module.router.weight.zero_()
        module.router.weight[2, 0] = 10.0  # every token with x_0 > 0 picks expert 2
    calls = []
    original = module.expert_delta
    module.expert_delta = lambda e, x: calls.append(e) or original(e, x)
    x = torch.randn(16, 8).abs()
    module(x).sum().backward()
    assert calls == [2]
    grads = module.lora_B.grad.abs().sum(dim=(1, 2))  # (E,)
    assert grads[2] > 0 and torch.all(grads[[0, 1, 3]] == 0)


def test_router_is_fp32_in_a_bf16_model():
    module = _module().to(torch.bfloat16)
    module.router.float()
    routing = module.router(torch.randn(4, 8, dtype=torch.bfloat16))
    assert module.router.weight.dtype == torch.float32 and routing.weights.dtype == torch.float32
    assert module(torch.randn(2, 3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_router_loss_definitions():
    router = TopKRouter(8, 4, 2, renormalize=False)
    x = torch.randn(10, 8)
    routing = router(x)
    logits = x @ router.weight.T
    torch.testing.assert_close(routing.z_loss, torch.logsumexp(logits, -1).pow(2).mean())
    probs = logits.softmax(-1)
    counts = torch.stack([(routing.experts == e).sum() for e in range(4)]).float()
    torch.testing.assert_close(routing.aux_loss, 4 * (counts / 20 * probs.mean(0)).sum())
    with torch.no_grad():
        router.weight.zero_()
    assert router(x).aux_loss.item() == pytest.approx(1.0)  # uniform probabilities, balanced count sums


def test_top_k_above_experts_is_an_error():
    with pytest.raises(ValueError, match="expert_top_k"):
        StrategyLoRAConfig(num_experts=2, expert_top_k=3)
    with pytest.raises(ValueError, match="expert_top_k"):
        _module(num_experts=2, top_k=3)
    cfg = StrategyLoRAConfig(num_experts=4, expert_top_k=2)
    cfg.expert_top_k = 5  # changed after construction, still caught
    with pytest.raises(ValueError, match="expert_top_k"):
        validate_strategy(cfg, "mixture_lora")


def test_injection_and_router_losses_through_the_runtime():
    model = small_model("qwen2")
    runtime = apply_strategy(model, StrategyLoRAConfig(num_experts=3, expert_top_k=2, lora_rank=2), "mixture_lora")
    assert sum(isinstance(m, MixtureLoRALinear) for m in model.modules()) == 3 * 2
    assert runtime.extra_loss(model) == (None, {})
    model(torch.randint(0, 128, (2, 5)))
    total, values = runtime.extra_loss(model)
    assert set(values) == {"router_z_loss", "router_aux_loss"}
    assert not any(v.requires_grad for v in values.values())  # detached: logging them keeps no graph
    expected = 1e-3 * values["router_z_loss"].item() + 1e-2 * values["router_aux_loss"].item()
    assert total.item() == pytest.approx(expected, rel=1e-5) and total.requires_grad
    assert runtime.extra_loss(model) == (None, {})  # consumed


def test_router_losses_skip_padding_tokens():
    torch.manual_seed(0)
    router = TopKRouter(8, num_experts=4, top_k=2, renormalize=False).train()
    real = torch.randn(6, 8)
    padded = torch.cat([real, 30 * torch.randn(4, 8)])  # padding rows with large logits
    router(real)
    expected = router.last_losses
    router(padded)
    unmasked = router.last_losses
    router.token_mask = torch.tensor([[1] * 6 + [0] * 4])  # (B=1, S=10), as the batch's attention mask
    router(padded)
    for got, want, other in zip(router.last_losses, expected, unmasked):
        torch.testing.assert_close(got, want)
        assert not torch.allclose(other, want)  # the padding would have changed both losses
    router.token_mask = torch.ones(1, 3)  # the mask of another forward: ignored, every token counts
    router(padded)
    torch.testing.assert_close(router.last_losses[0], unmasked[0])


def _toy_task(seed=0, d=8, experts=4):
    """A mixture whose expert 0 is exactly the target delta; the others are random."""
    torch.manual_seed(seed)
    module = MixtureLoRALinear(nn.Linear(d, d), experts, top_k=1, r=d, lora_alpha=d, use_rslora=False)
    target = torch.randn(d, d) * 0.5
    with torch.no_grad():
        module.lora_A[0].copy_(torch.eye(d))
        module.lora_B[0].copy_(target)
        module.lora_B[1:].normal_(std=0.5)
    module.lora_A.requires_grad_(False)
    module.lora_B.requires_grad_(False)
    module.base.requires_grad_(False)
    return module, target


STEPS = 60


def test_router_learns_the_better_expert_and_losses_stay_finite():
    module, target = _toy_task()
    opt = torch.optim.AdamW(module.router.parameters(), lr=0.05, weight_decay=0.0)
    x = torch.randn(256, 8) + 2.0  # a bias-free router needs inputs off the origin to prefer one expert everywhere
    with torch.no_grad():
        module.router.weight[0] = -0.05  # start with the good expert out of favour
    y = module.base(x) + x @ target.T
    task_losses, share = [], []
    for _ in range(STEPS):
        loss = F.mse_loss(module(x), y)
        z, aux = module.router.last_losses
        assert torch.isfinite(z) and torch.isfinite(aux)
        (loss + 1e-3 * z + 1e-3 * aux).backward()
        opt.step()
        opt.zero_grad()
        task_losses.append(loss.item())
        share.append((module.router(x).experts == 0).float().mean().item())
    assert task_losses[-1] < 0.5 * task_losses[0]
    assert share[-1] > 0.9 and share[0] < 0.5


def test_router_losses_decrease_when_optimised():
    module, _ = _toy_task(seed=1)
    with torch.no_grad():
        module.router.weight.mul_(5)
        module.router.weight[0] += 3.0  # large logits (z-loss) and most tokens on expert 0 (imbalance)
    opt = torch.optim.AdamW(module.router.parameters(), lr=0.05, weight_decay=0.0)
    x = torch.randn(256, 8).abs()
    history = []
    for _ in range(40):
        module(x)
        z, aux = module.router.last_losses
        history.append((z.item(), aux.item()))
        (1e-2 * z + aux).backward()
        opt.step()
        opt.zero_grad()
    assert history[-1][0] < history[0][0] and history[-1][1] < history[0][1]
    assert torch.isfinite(torch.tensor(history)).all()


def _router_grads(checkpointing: bool) -> dict:
    model = small_model("qwen2")
    torch.manual_seed(0)  # the same routers and experts in both runs
    runtime = apply_strategy(model, StrategyLoRAConfig(num_experts=3, expert_top_k=2, lora_rank=2,
                                                       router_z_loss_coef=1.0, router_aux_loss_coef=1.0),
                             "mixture_lora")
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    runtime.set_token_mask(mask)
    model(input_ids=ids, attention_mask=mask)
    extra, _ = runtime.extra_loss(model)
    extra.backward()  # checkpointing recomputes the routers here, after extra_loss was taken
    return {n: p.grad.clone() for n, p in model.named_parameters() if "router" in n and p.grad is not None}


def test_router_loss_gradients_are_the_same_under_gradient_checkpointing():
    plain, checkpointed = _router_grads(False), _router_grads(True)
    assert plain and plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_router_runs_in_fp32_under_bf16_autocast():
    router = TopKRouter(8, num_experts=4, top_k=2, renormalize=True).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(torch.randn(6, 8, dtype=torch.bfloat16))
    assert routing.weights.dtype == routing.z_loss.dtype == routing.aux_loss.dtype == torch.float32
