"""The Triton score pre-pass against the eager reference: on CUDA (``gpu``), and on CPU through
Triton's interpreter when ``triton`` is installed (it is not a dependency)."""

import os
import subprocess
import sys

import pytest
import torch

from molf.optim import prepass
from molf.optim.scores import get_score_fn

CHECK = """
import torch
from molf.optim import prepass, triton_scores
from molf.optim.scores import get_score_fn

device = torch.device("{device}")
gen = torch.Generator().manual_seed(0)
shapes = [(3000,), (64, 33), (1,), (5000, 3), (2048,)]
grads = [(torch.randn(s, generator=gen) * 1e-3).to(device) for s in shapes]
exp_avgs = [(torch.randn(s, generator=gen) * 1e-4).to(device) for s in shapes]
exp_avg_sqs = [(torch.rand(s, generator=gen) * 1e-6).to(device) for s in shapes]
for name in ("true_projected", "projected"):
    fn = get_score_fn(name)
    assert triton_scores.supports(fn, grads, grads)
    plan = triton_scores.plan_for(None, grads, exp_avgs, exp_avg_sqs)
    got = triton_scores.tensor_sums(fn, plan, grads, 0.9, 0.999)
    again = triton_scores.tensor_sums(fn, triton_scores.plan_for(plan, grads, exp_avgs, exp_avg_sqs),
                                      [g.clone() for g in grads], 0.9, 0.999)
    eager = prepass.eager_tensor_sums(fn, prepass.eager_plan([g.numel() for g in grads], device), grads,
                                      exp_avgs, exp_avg_sqs, 0.9, 0.999)
    assert got.shape == (len(shapes),) and got.dtype == torch.float32
    assert torch.equal(got, again), (got, again)  # deterministic, also with moved gradients
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=0)
    assert (got > 0).all()
    # bf16: the scores of the moments as the update stores them (each rounded once to bf16), in fp64
    g16, m16, v16 = ([t.bfloat16() for t in ts] for ts in (grads, exp_avgs, exp_avg_sqs))
    got = triton_scores.tensor_sums(fn, triton_scores.plan_for(None, g16, m16, v16), g16, 0.9, 0.999)
    stored_m = [torch.lerp(m, g, 0.1).double() for g, m in zip(g16, m16)]
    stored_v = [(v.float() * 0.999 + 0.001 * g.float() * g.float()).bfloat16().double() for g, v in zip(g16, v16)]
    want = torch.stack([fn.term(m, v.sqrt(), 1e-8).sum() if fn.term is not None
                        else fn.tensor_sums([m], [v.sqrt()], 1e-8)[0] for m, v in zip(stored_m, stored_v)])
    torch.testing.assert_close(got.double(), want.cpu(), rtol=1e-5, atol=0)
print("ok")
"""


def _run_check(device, env):
    out = subprocess.run([sys.executable, "-c", CHECK.format(device=device)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_triton_kernel_matches_eager_under_the_interpreter():
    pytest.importorskip("triton")
    _run_check("cpu", {**os.environ, "TRITON_INTERPRET": "1"})


def test_a_bucket_scored_eagerly_before_gets_a_triton_plan():
    # A step whose gradients the kernel turned down is scored eagerly and leaves an EagerPlan behind.
    from molf.optim import triton_scores

    tensors = [torch.zeros(5000), torch.zeros(3, 7)]
    eager = prepass.eager_plan([t.numel() for t in tensors], tensors[0].device)
    plan = triton_scores.plan_for(eager, tensors, tensors, tensors)
    assert isinstance(plan, triton_scores.TritonPlan) and plan.partials.numel() == 3 + 1


@pytest.mark.gpu
def test_triton_kernel_matches_eager_on_cuda():
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _run_check("cuda", dict(os.environ))


@pytest.mark.gpu
def test_optimizer_on_cuda_routes_like_eager_with_one_sync():
    """Full optimizer on CUDA: triton and eager backends pick the same winners; one sync per step."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from conftest import small_model

    from molf.model import molf_modules
    from molf.optim import MoLFAdamW, OptimConfig
    from molf.testing import count_host_syncs
    from test_molf_adamw import WrapConfig, _batch
    from molf.model import wrap_model_with_molf

    cfg = OptimConfig(learning_rate=1e-3, lora_learning_rate=2e-3)
    models, optimizers = [], []
    for backend in ("triton", "eager"):
        model = small_model("qwen2", seed=0)
        torch.manual_seed(1)
        wrap_model_with_molf(model, WrapConfig(molf_lora_ranks=[4, 16], lora_dropout=0.0))
        model.cuda()
        models.append(model)
        optimizers.append(MoLFAdamW.from_config(model, cfg, score_backend=backend))
    for step in range(3):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            ids = _batch(step).cuda()
            model(ids, labels=ids).loss.backward()
            with count_host_syncs() as syncs:
                optimizer.step()
            assert syncs.count == 1, syncs.calls
        triton_routing, eager_routing = (o.last_routing for o in optimizers)
        torch.testing.assert_close(triton_routing.scores, eager_routing.scores, rtol=1e-4, atol=0)
        assert torch.equal(triton_routing.winners, eager_routing.winners)
    assert len(molf_modules(models[0])) == triton_routing.scores.shape[0]


def test_eager_plan_bounds_batches():
    plan = prepass.eager_plan([10, 25, 3, 7], torch.device("cpu"), chunk=8)
    assert all(sum(p.stop - p.start for p in batch) <= 8 for batch in plan.batches)
    covered = {}
    for batch in plan.batches:
        for p in batch:
            covered.setdefault(p.index, []).append((p.start, p.stop))
    assert {i: sum(b - a for a, b in r) for i, r in covered.items()} == {0: 10, 1: 25, 2: 3, 3: 7}
    assert plan.owners.tolist() == [p.index for batch in plan.batches for p in batch]


def test_eager_and_compiled_prepass_agree_with_the_moment_update():
    """Sums of the would-be moments equal the score of the updated moments (foreach path's input)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(40, 30), (7,), (1000,)]
    g, m = ([torch.randn(s, generator=gen) * 1e-3 for s in shapes] for _ in range(2))
    v = [torch.rand(s, generator=gen) * 1e-6 for s in shapes]
    for name in ("true_projected", "projected"):
        fn = get_score_fn(name)
        new_m = [torch.lerp(a, b, 0.1) for a, b in zip(m, g)]
        new_v = [b * 0.999 + 0.001 * x * x for b, x in zip(v, g)]
        want = fn.tensor_sums(new_m, [x.sqrt() for x in new_v], 1e-8)
        plan = prepass.eager_plan([x.numel() for x in g], torch.device("cpu"), chunk=500)
        torch.testing.assert_close(prepass.eager_tensor_sums(fn, plan, g, m, v, 0.9, 0.999), want, rtol=1e-5, atol=0)
        if name == "true_projected":  # one compile for the whole suite (dynamic shapes)
            torch.testing.assert_close(prepass.compiled_tensor_sums(fn, g, m, v, 0.9, 0.999), want, rtol=1e-5, atol=0)


def test_bf16_prepass_scores_the_moments_fused_adamw_stores():
    """In bf16 the would-be moments are rounded once, as ``torch._fused_adamw_`` stores them (two foreach
    ops, ``mul`` then ``addcmul``, would round ``v`` twice: 1 ulp off in about a tenth of the elements)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(40, 30), (7,), (3000,)]
    g = [(torch.randn(s, generator=gen) * 1e-3).bfloat16() for s in shapes]
    m = [(torch.randn(s, generator=gen) * 1e-4).bfloat16() for s in shapes]
    v = [(torch.rand(s, generator=gen) * 1e-6).bfloat16() for s in shapes]
    stored_m, stored_v = [t.clone() for t in m], [t.clone() for t in v]
    torch._fused_adamw_([torch.zeros_like(t) for t in g], g, stored_m, stored_v, [],
                        [torch.tensor(1.0) for _ in g], lr=0.0, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
                        amsgrad=False, maximize=False, grad_scale=None, found_inf=None)
    for name in ("true_projected", "projected"):
        fn = get_score_fn(name)
        want = torch.stack([fn.term(a.double(), b.double().sqrt(), 1e-8).sum() for a, b in zip(stored_m, stored_v)])
        plan = prepass.eager_plan([x.numel() for x in g], torch.device("cpu"), chunk=500)
        got = prepass.eager_tensor_sums(fn, plan, g, m, v, 0.9, 0.999)
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0)
        if name == "true_projected":
            got = prepass.compiled_tensor_sums(fn, g, m, v, 0.9, 0.999)
            torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0)
