import copy
import io
from dataclasses import dataclass

import pytest
import torch
from conftest import small_model

from molf.model import LoRAConfig, MoLFConfig, molf_modules, wrap_model_with_molf
from molf.optim import MoLFAdamW, OptimConfig, build_param_groups
from molf.testing import count_host_syncs


@dataclass
class WrapConfig(MoLFConfig, LoRAConfig):
    pass


OPTIM = OptimConfig(learning_rate=1e-3, lora_learning_rate=3e-3, weight_decay=0.1, lora_weight_decay=0.01)


def _molf_model(family="qwen2", ranks=(4, 8), fft=True, seed=0, **overrides):
    model = small_model(family, seed=seed, **overrides)
    torch.manual_seed(seed + 1)
    wrap_model_with_molf(model, WrapConfig(molf_lora_ranks=list(ranks), molf_fft=fft, lora_dropout=0.0))
    return model


def _batch(seed=0):
    return torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(seed))


def _optimizer_after_backward(model, path):
    """``model``'s optimizer on ``path``, with the gradients of one batch in place (no step yet)."""
    optimizer = MoLFAdamW.from_config(model, OPTIM, **PATH_KWARGS[path])
    ids = _batch()
    model(ids, labels=ids).loss.backward()
    return optimizer


def _warmup(optimizer, warmup=3):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: min(1.0, t / warmup))


def _train_step(model, optimizer, scheduler, seed):
    optimizer.zero_grad()
    ids = _batch(seed)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()


def _assert_models_equal(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


# The three implementations of the step: the native CPU kernels (what ``auto`` picks here), the fused
# path with the eager score pre-pass, and the foreach path.
PATH_KWARGS = {"native": dict(fused=True, score_backend="native"), "prepass": dict(fused=True, score_backend="eager"),
               "foreach": dict(fused=False)}
PATHS = pytest.mark.parametrize("path", list(PATH_KWARGS))


@PATHS
@pytest.mark.parametrize("fft, ranks, topk", [(True, (4, 8), 3), (True, (4,), 5), (False, (4, 8), 2)])
def test_topk_all_experts_is_bit_identical_to_adamw(fft, ranks, topk, path):
    """The native and prepass paths against AdamW(fused=True), the foreach path against AdamW(foreach=True)."""
    fused = path != "foreach"
    cfg = OptimConfig(**{**vars(OPTIM), "molf_topk": topk})
    model = _molf_model(ranks=ranks, fft=fft)
    reference = copy.deepcopy(model)
    molf = MoLFAdamW.from_config(model, cfg, **PATH_KWARGS[path])
    assert molf.fused is fused
    adamw = torch.optim.AdamW(build_param_groups(reference, cfg), **({"fused": True} if fused else {"foreach": True}))
    molf_sched, adamw_sched = _warmup(molf), _warmup(adamw)
    for step in range(6):
        _train_step(model, molf, molf_sched, step)
        _train_step(reference, adamw, adamw_sched, step)
        _assert_models_equal(model, reference)
        assert molf.last_routing.winners.sum() == len(molf.module_names) * len(ranks + ((0,) if fft else ()))
    for p in model.parameters():
        if p.requires_grad:
            ref = adamw.state[dict(zip(map(id, model.parameters()), reference.parameters()))[id(p)]]
            assert torch.equal(molf.state[p]["exp_avg_sq"], ref["exp_avg_sq"])
            assert torch.equal(molf.state[p]["exp_avg"], ref["exp_avg"])
            assert float(molf.state[p]["step"]) == float(ref["step"]) == 6


@PATHS
def test_step_zero_under_warmup_routes_every_module_to_fft(path):
    model = _molf_model()
    optimizer = MoLFAdamW.from_config(model, OPTIM, **PATH_KWARGS[path])
    _train_step(model, optimizer, _warmup(optimizer), 0)
    routing = optimizer.last_routing
    assert routing.step == 1 and routing.expert_names == ["fft", "lora0_r4", "lora1_r8"]
    assert routing.scores.shape == (len(routing.module_names), 3) and routing.scores.dtype == torch.float32
    assert torch.equal(routing.scores, torch.zeros_like(routing.scores))
    assert routing.winners[:, 0].all() and not routing.winners[:, 1:].any()


def _expert_snapshot(model, optimizer):
    return [[[(p.detach().clone(), optimizer.state[p]["exp_avg"].clone()) if p in optimizer.state else
              (p.detach().clone(), None) for p in expert] for expert in module.expert_params()]
            for _, module in molf_modules(model)]


@PATHS
def test_top1_updates_winners_only_while_loser_moments_move(path):
    model = _molf_model(ranks=(4, 16))
    cfg = OptimConfig(**{**vars(OPTIM), "lora_learning_rate": 3e-4})  # both kinds win somewhere
    optimizer = MoLFAdamW.from_config(model, cfg, **PATH_KWARGS[path])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0)
    seen = torch.zeros(3, dtype=torch.bool)
    for step in range(4):
        before = _expert_snapshot(model, optimizer)
        _train_step(model, optimizer, scheduler, step)
        after = _expert_snapshot(model, optimizer)
        winners = optimizer.last_routing.winners
        assert (winners.sum(dim=1) == 1).all()
        seen |= winners.any(dim=0)
        for m, (old_module, new_module) in enumerate(zip(before, after)):
            for e, (old, new) in enumerate(zip(old_module, new_module)):
                changed = [not torch.equal(o[0], n[0]) for o, n in zip(old, new)]
                if winners[m, e]:
                    assert any(changed), (m, e)
                else:
                    assert not any(changed), (m, e)
                    moved = [o[1] is None or not torch.equal(o[1], n[1]) for o, n in zip(old, new)]
                    assert any(moved), (m, e)
    assert seen[0] and seen[1:].any()  # both the FFT and a LoRA expert won somewhere


@PATHS
def test_molf_e_never_changes_the_base(path):
    model = _molf_model(fft=False, ranks=(4, 8))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert base
    optimizer = MoLFAdamW.from_config(model, OPTIM, **PATH_KWARGS[path])
    assert [g["kind"] for g in optimizer.param_groups] == ["lora", "other_no_decay", "other"]
    scheduler = _warmup(optimizer, warmup=1)
    for step in range(3):
        _train_step(model, optimizer, scheduler, step)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    assert bool((optimizer.last_routing.winners.sum(dim=1) == 1).all())  # one LoRA expert wins in every module


def _run(model, optimizer, scheduler, steps):
    for step in steps:
        _train_step(model, optimizer, scheduler, step)


@PATHS
def test_state_dict_round_trip_continues_identically(path):
    cfg = OptimConfig(**{**vars(OPTIM), "lora_learning_rate": 2e-2})
    model = _molf_model()
    optimizer = MoLFAdamW.from_config(model, cfg, **PATH_KWARGS[path])
    scheduler = _warmup(optimizer)
    _run(model, optimizer, scheduler, range(3))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict(), "sched": scheduler.state_dict()},
               buffer)
    _run(model, optimizer, scheduler, range(3, 6))

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _molf_model(seed=7)  # a fresh model and optimizer, as the HF Trainer builds them on resume
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = MoLFAdamW.from_config(resumed, cfg, **PATH_KWARGS[path])
    resumed_scheduler = _warmup(resumed_optimizer)  # built before loading, in the Trainer's order
    resumed_optimizer.load_state_dict(saved["optim"])
    resumed_scheduler.load_state_dict(saved["sched"])
    _run(resumed, resumed_optimizer, resumed_scheduler, range(3, 6))
    _assert_models_equal(resumed, model)
    assert resumed_optimizer.last_routing.step == optimizer.last_routing.step == 6
    assert torch.equal(resumed_optimizer.last_routing.winners, optimizer.last_routing.winners)


def test_param_groups_hold_no_tensors_besides_params():
    optimizer = MoLFAdamW.from_config(_molf_model(), OPTIM)
    for group in optimizer.state_dict()["param_groups"]:
        for key, value in group.items():
            assert not isinstance(value, torch.Tensor), key
            if isinstance(value, (list, tuple)):
                assert all(not isinstance(v, torch.Tensor) for v in value), key


@pytest.mark.parametrize("layers", [1, 4])
@PATHS
def test_one_host_sync_per_step_whatever_the_size(layers, path):
    model = _molf_model(num_hidden_layers=layers)
    optimizer = MoLFAdamW.from_config(model, OPTIM, **PATH_KWARGS[path])
    ids = _batch()
    for _ in range(3):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        with count_host_syncs() as syncs:
            optimizer.step()
        assert syncs.count == 1, syncs.calls


@PATHS
def test_non_finite_gradient_resets_only_that_expert(path):
    model = _molf_model()
    optimizer = MoLFAdamW.from_config(model, OPTIM, **PATH_KWARGS[path])
    scheduler = _warmup(optimizer, warmup=1)
    _run(model, optimizer, scheduler, range(2))
    name, module = molf_modules(model)[0]
    lora_b = module.lora_B[0]
    weights_before = lora_b.detach().clone()
    optimizer.zero_grad()
    ids = _batch(9)
    model(ids, labels=ids).loss.backward()
    lora_b.grad[0, 0] = float("nan")
    others_before = [p.detach().clone() for p in module.expert_params()[0]]
    optimizer.step()
    routing = optimizer.last_routing
    assert not torch.isfinite(routing.scores[0, 1]) and not routing.winners[0, 1]
    assert routing.winners[0].sum() == 1
    assert torch.equal(lora_b, weights_before)
    state = optimizer.state[lora_b]
    assert state["step"] == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    assert optimizer.nonfinite_resets == 1
    restored = MoLFAdamW.from_config(model, OPTIM, **PATH_KWARGS[path])
    restored.load_state_dict(optimizer.state_dict())  # the count goes on after a resume
    assert restored.nonfinite_resets == 1
    assert torch.isfinite(routing.scores[1:, :]).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if routing.winners[0, 0]:
        assert not all(torch.equal(a, b) for a, b in zip(others_before, module.expert_params()[0]))


def test_expert_missing_from_groups_raises():
    model = _molf_model()
    groups = [g for g in build_param_groups(model, OPTIM) if g["kind"] != "lora"]
    with pytest.raises(ValueError, match="every parameter of an expert"):
        MoLFAdamW(groups, model)


def test_expert_split_across_groups_raises():
    model = _molf_model()
    lora = [p for _, m in molf_modules(model) for e in m.expert_params()[1:] for p in e]
    first, rest = lora[:1], lora[1:]
    fft = [p for _, m in molf_modules(model) for p in m.expert_params()[0]]
    with pytest.raises(ValueError, match="every parameter of an expert"):
        MoLFAdamW([{"params": fft}, {"params": first}, {"params": rest}], model)


def test_bad_topk_and_score_raise():
    model = _molf_model()
    with pytest.raises(ValueError, match="topk"):
        MoLFAdamW(model.parameters(), model, topk=0)
    with pytest.raises(ValueError, match="molf_score_fn"):
        MoLFAdamW(model.parameters(), model, score_fn="nope")


@pytest.mark.parametrize("source, target", [("foreach", "prepass"), ("prepass", "native"), ("native", "foreach")])
def test_checkpoints_move_between_paths(source, target):
    """A state saved by one path continues on another exactly as it would have on the first."""
    model = _molf_model()
    reference = copy.deepcopy(model)
    first = MoLFAdamW.from_config(model, OPTIM, **PATH_KWARGS[source])
    first_scheduler = _warmup(first)
    _run(model, first, first_scheduler, range(2))
    second = MoLFAdamW.from_config(model, OPTIM, **PATH_KWARGS[target])
    scheduler = _warmup(second)
    second.load_state_dict(first.state_dict())
    scheduler.load_state_dict(first_scheduler.state_dict())
    _run(model, second, scheduler, range(2, 3))
    expert_ids = {id(p) for _, m in molf_modules(model) for e in m.expert_params() for p in e}
    for p in model.parameters():
        if p.requires_grad:
            step = second.state[p]["step"]
            host = target == "foreach" or (target == "native" and id(p) in expert_ids)
            assert isinstance(step, float) if host else (isinstance(step, torch.Tensor) and step.dtype == torch.float32)
            assert float(step) == 3
    same = MoLFAdamW.from_config(reference, OPTIM, **PATH_KWARGS[source])
    _run(reference, same, _warmup(same), range(3))
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


def test_bad_score_backend_raises():
    model = _molf_model()
    with pytest.raises(ValueError, match="score_backend"):
        MoLFAdamW(model.parameters(), model, score_backend="cuda")
    optimizer = MoLFAdamW.from_config(model, OPTIM, score_backend="triton")  # CPU parameters
    ids = _batch()
    model(ids, labels=ids).loss.backward()
    with pytest.raises(ValueError, match="triton"):
        optimizer.step()


def test_config_score_backend_reaches_the_optimizer_and_auto_is_native_on_cpu():
    from dataclasses import replace

    from molf.optim.prepass import resolve_backend

    model = _molf_model()
    assert MoLFAdamW.from_config(model, replace(OPTIM, molf_score_backend="eager")).score_backend == "eager"
    assert MoLFAdamW.from_config(model, OPTIM, score_backend="compile").score_backend == "compile"
    assert resolve_backend("auto", torch.device("cpu")) == "native"  # a C compiler is part of the test setup
    assert resolve_backend("auto", torch.device("cuda")) == "eager"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["prepass", "foreach"])
def test_scores_are_fp32_math_in_low_precision(dtype, path):
    """eps_s = 1e-8 is 0 in fp16: a LoRA expert whose gradient is exactly zero (lora_A while B = 0)
    would score 0/0 = NaN and be reset every step if the terms were computed in the moments' dtype."""
    model = _molf_model(ranks=(4,)).to(dtype)
    optimizer = _optimizer_after_backward(model, path)
    optimizer.step()
    scores = optimizer.last_routing.scores
    assert bool(torch.isfinite(scores).all()) and optimizer.nonfinite_resets == 0
    # EPD in float64 from the stored moments, for every expert of the first module.
    _, module = molf_modules(model)[0]
    for e, (params, lr) in enumerate(zip(module.expert_params(), (1e-3, 3e-3))):
        total = sum((optimizer.state[p]["exp_avg"].double() ** 2
                     / (optimizer.state[p]["exp_avg_sq"].double().sqrt() + 1e-8)).sum() for p in params)
        expected = lr * total / sum(p.numel() for p in params)
        assert float(scores[0, e]) == pytest.approx(float(expected), rel=2e-5)


def test_zero_eps_is_refused():
    model = _molf_model()
    with pytest.raises(ValueError, match="eps > 0"):
        MoLFAdamW(model.parameters(), model, eps=0.0)
    with pytest.raises(ValueError, match="adam_epsilon must be > 0"):
        OptimConfig(adam_epsilon=0.0)


@PATHS
def test_a_module_without_gradient_this_step_has_no_winner(path):
    model = _molf_model(ranks=(4,))
    optimizer = _optimizer_after_backward(model, path)
    unused = [name for name, _ in molf_modules(model)][-1]
    module = dict(molf_modules(model))[unused]
    for p in module.parameters():
        p.grad = None  # as if the forward had skipped this module
    before = [p.detach().clone() for p in module.parameters()]
    optimizer.step()
    row = optimizer.module_names.index(unused)
    assert not bool(optimizer.last_routing.winners[row].any())
    assert bool(optimizer.last_routing.winners.sum(dim=1)[:row].eq(1).all())
    assert optimizer.nonfinite_resets == 0
    assert all(torch.equal(p, q) for p, q in zip(module.parameters(), before))


@PATHS
def test_an_expert_with_a_gradient_on_only_some_tensors_is_not_scored(path):
    model = _molf_model(ranks=(4,))
    optimizer = _optimizer_after_backward(model, path)
    name, module = molf_modules(model)[0]
    module.lora_A[0].grad = None  # lora_B[0] keeps its gradient: half an expert
    optimizer.step()
    row, lora = optimizer.module_names.index(name), optimizer.expert_names.index("lora0_r4")
    assert optimizer.last_routing.scores[row, lora] == float("-inf")
    assert not bool(optimizer.last_routing.winners[row, lora])
    optimizer.zero_grad()
    ids = _batch(1)
    model(ids, labels=ids).loss.backward()  # a full gradient again: the expert is scored again
    optimizer.step()
    assert torch.isfinite(optimizer.last_routing.scores[row, lora])


@PATHS
def test_a_non_finite_gradient_on_half_an_expert_leaves_its_weights_and_resets_it(path):
    # The expert is scored out (a gradient on only some tensors); its NaN must not reach the weights on
    # any path (the pre-pass path's lr = 0 kernel would write p - 0 * nan).
    model = _molf_model(ranks=(4,))
    optimizer = _optimizer_after_backward(model, path)
    name, module = molf_modules(model)[0]
    module.lora_A[0].grad = None
    module.lora_B[0].grad[0, 0] = float("nan")
    before = module.lora_B[0].detach().clone()
    optimizer.step()
    assert torch.equal(module.lora_B[0], before)
    state = optimizer.state[module.lora_B[0]]
    assert state["step"] == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    assert optimizer.nonfinite_resets == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_step_counts_keep_counting_when_a_non_native_tensor_lacks_a_gradient():
    # A non-contiguous expert weight keeps its group off the native kernels; a step where it has no
    # gradient must not move the rest of the group onto them (step counts would then live in two forms).
    from torch import nn

    from molf.model.molf_linear import MoLFLinear

    torch.manual_seed(0)
    first, second = nn.Linear(4, 3), nn.Linear(4, 3)
    first.weight = nn.Parameter(first.weight.detach().t().contiguous().t())  # non-contiguous fp32 CPU
    model = nn.Sequential(MoLFLinear(first, [2], [16.0]), MoLFLinear(second, [2], [16.0]))
    optimizer = MoLFAdamW(model.parameters(), model, lr=1e-2)
    for step in range(5):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        if step in (1, 2):
            model[0].weight.grad = None
        optimizer.step()
    assert float(optimizer.state[model[1].weight]["step"]) == 5
    assert float(optimizer.state[model[0].weight]["step"]) == 3


def test_a_step_without_expert_gradients_leaves_no_routing_decision():
    model = _molf_model()
    optimizer = _optimizer_after_backward(model, "native")
    optimizer.step()
    assert optimizer.last_routing is not None
    experts = {id(p) for _, m in molf_modules(model) for ps in m.expert_params() for p in ps}
    for p in model.parameters():
        if id(p) in experts:
            p.grad = None  # only the embeddings and norms have gradients this step
    optimizer.step()
    assert optimizer.last_routing is None


def test_a_frozen_expert_parameter_is_named():
    model = _molf_model()
    name, module = molf_modules(model)[0]
    module.lora_B[0].requires_grad_(False)
    with pytest.raises(ValueError, match=rf"{name}\.lora_B\.0 \(requires_grad=False\) not in the optimizer"):
        MoLFAdamW.from_config(model, OPTIM)


def test_score_backend_without_the_fused_path_warns():
    model = _molf_model()
    with pytest.warns(UserWarning, match="score_backend='eager' is ignored"):
        MoLFAdamW(model.parameters(), model, fused=False, score_backend="eager")


def test_two_modules_sharing_an_expert_parameter_are_refused():
    from torch import nn

    from molf.model.molf_linear import MoLFLinear

    shared = nn.Linear(8, 8)
    model = nn.Sequential(MoLFLinear(shared, [2], [2.0]), MoLFLinear(shared, [2], [2.0]))
    with pytest.raises(ValueError, match="share an expert parameter"):
        MoLFAdamW(model.parameters(), model)
