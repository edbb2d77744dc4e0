"""The native CPU kernels of MoLFAdamW (``molf.optim.native``)."""

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import small_model

from molf.model import LoRAConfig, MoLFConfig, wrap_model_with_molf
from molf.optim import MoLFAdamW, OptimConfig, native, prepass
from molf.optim.scores import get_score_fn

# Sizes around the vector width, the kernel's 16 lanes and its block of 65536 elements.
SHAPES = [(1,), (5,), (15,), (16,), (17,), (37, 53), (64, 64), (native.BLOCK + 9,), (3, native.BLOCK // 2 + 1), (0,)]
BIT_EXACT = torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX2")  # measured there (native.tail_widths)


def _tensors(seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    exp_avgs = [torch.randn(s, generator=gen) * 1e-3 for s in SHAPES]
    exp_avg_sqs = [torch.rand(s, generator=gen) * 1e-6 for s in SHAPES]
    grads = [torch.randn(s, generator=gen) * 1e-3 * scale for s in SHAPES]
    return params, grads, exp_avgs, exp_avg_sqs


def _assert_same(a, b, what):
    for i, (x, y) in enumerate(zip(a, b)):
        if BIT_EXACT:
            assert torch.equal(x, y), (what, SHAPES[i], int((x != y).sum()))
        else:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=0, msg=f"{what} {SHAPES[i]}")


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("beta1", [0.9, 0.3])
def test_kernels_equal_torch_fused_adamw_over_steps(weight_decay, beta1):
    lr, beta2, eps = 1e-3, 0.999, 1e-8
    params, _, exp_avgs, exp_avg_sqs = _tensors(0)
    ref = [[t.clone() for t in ts] for ts in (params, exp_avgs, exp_avg_sqs)]
    plan = native.plan([p.numel() for p in params])
    ref_steps = [torch.tensor(0.0) for _ in params]
    for step in range(1, 5):
        grads = _tensors(step)[1]
        ref_grads = [g.clone() for g in grads]
        native.moments_scores(plan, grads, exp_avgs, exp_avg_sqs, np.full(len(params), float(step)), lr, beta1,
                              beta2, eps, 1e-8, "ratio_times_m")
        native.apply(plan, params, grads, np.ones(len(params), dtype=bool), lr, weight_decay)
        torch._foreach_add_(ref_steps, 1)
        torch._fused_adamw_(ref[0], ref_grads, ref[1], ref[2], [], ref_steps, lr=lr, beta1=beta1, beta2=beta2,
                            weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
        _assert_same(exp_avgs, ref[1], "exp_avg")
        _assert_same(exp_avg_sqs, ref[2], "exp_avg_sq")
        _assert_same(params, ref[0], "param")


def test_pass_one_writes_the_increment_over_the_gradient_and_pass_two_only_touches_winners():
    lr, step = 1e-2, 3.0
    params, grads, exp_avgs, exp_avg_sqs = _tensors(1)
    new_m = [torch.lerp(m, g, 0.1) for m, g in zip(exp_avgs, grads)]
    new_v = [v * 0.999 + 0.001 * g * g for v, g in zip(exp_avg_sqs, grads)]
    want = [-lr / (1 - 0.9 ** step) * m / (v.sqrt() / (1 - 0.999 ** step) ** 0.5 + 1e-8) for m, v in zip(new_m, new_v)]
    plan = native.plan([p.numel() for p in params])
    native.moments_scores(plan, grads, exp_avgs, exp_avg_sqs, np.full(len(params), step), lr, 0.9, 0.999, 1e-8, 1e-8,
                          "ratio_squared")
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-12)
    before = [p.clone() for p in params]
    winners = np.arange(len(params)) % 2 == 0
    native.apply(plan, params, grads, winners, lr, 0.0)
    for i, (p, old, x) in enumerate(zip(params, before, grads)):
        if winners[i]:
            assert torch.equal(p, old + x)
        else:
            assert torch.equal(p, old)


@pytest.mark.parametrize("score", ["true_projected", "projected"])
def test_score_sums_match_the_eager_prepass_and_ignore_the_thread_count(score):
    fn = get_score_fn(score)
    _, grads, exp_avgs, exp_avg_sqs = _tensors(2)
    eager_plan = prepass.eager_plan([g.numel() for g in grads], torch.device("cpu"))
    want = prepass.eager_tensor_sums(fn, eager_plan, grads, exp_avgs, exp_avg_sqs, 0.9, 0.999)
    plan = native.plan([g.numel() for g in grads])
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            g, m, v = ([t.clone() for t in ts] for ts in (grads, exp_avgs, exp_avg_sqs))
            results.append(native.moments_scores(plan, g, m, v, np.ones(len(g)), 1e-3, 0.9, 0.999, 1e-8, 1e-8,
                                                 fn.native_term))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])
    torch.testing.assert_close(results[0], want, rtol=1e-5, atol=0)
    assert results[0][-1] == 0  # the empty tensor


def test_non_finite_gradient_gives_a_non_finite_sum_for_its_tensor_only():
    _, grads, exp_avgs, exp_avg_sqs = _tensors(3)
    grads[5][2, 7] = float("nan")
    grads[7][-1] = float("inf")
    plan = native.plan([g.numel() for g in grads])
    sums = native.moments_scores(plan, grads, exp_avgs, exp_avg_sqs, np.ones(len(grads)), 1e-3, 0.9, 0.999, 1e-8,
                                 1e-8, "ratio_times_m")
    finite = torch.isfinite(sums)
    assert not finite[5] and not finite[7] and finite[[0, 1, 2, 3, 4, 6, 8, 9]].all()


@dataclass
class _WrapConfig(MoLFConfig, LoRAConfig):
    pass


def _model():
    model = small_model("qwen2", seed=0)
    torch.manual_seed(1)
    wrap_model_with_molf(model, _WrapConfig(molf_lora_ranks=[4, 8], lora_dropout=0.0))
    return model


OPTIM = OptimConfig(learning_rate=1e-3, lora_learning_rate=3e-3, weight_decay=0.1, lora_weight_decay=0.01)


def test_auto_uses_the_native_kernels_and_routes_like_the_eager_prepass():
    model = _model()
    reference = copy.deepcopy(model)
    auto = MoLFAdamW.from_config(model, OPTIM)
    eager = MoLFAdamW.from_config(reference, OPTIM, score_backend="eager")
    for step in range(4):
        for m, opt in ((model, auto), (reference, eager)):
            opt.zero_grad()
            ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(step))
            m(ids, labels=ids).loss.backward()
            opt.step()
        assert torch.equal(auto.last_routing.winners, eager.last_routing.winners)
        torch.testing.assert_close(auto.last_routing.scores, eager.last_routing.scores, rtol=1e-5, atol=0)
    assert all(b.native is not None for b in auto._gather() if b.cells is not None)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A clean build cache and loader for the test; the real loader is restored afterwards."""
    monkeypatch.setenv("MOLF_NATIVE_CACHE", str(tmp_path / "cache"))
    native._load_once.cache_clear()
    yield monkeypatch
    native._load_once.cache_clear()


def test_disabled_native_falls_back_to_eager_and_explicit_native_says_why(fresh_native):
    fresh_native.setenv("MOLF_NATIVE", "0")
    assert not native.available() and "MOLF_NATIVE=0" in native.unavailable_reason()
    assert prepass.resolve_backend("auto", torch.device("cpu")) == "eager"
    with pytest.raises(ValueError, match="MOLF_NATIVE=0"):
        prepass.resolve_backend("native", torch.device("cpu"))


def test_missing_compiler_is_reported(fresh_native):
    fresh_native.setenv("CC", "no-such-compiler-molf")
    with pytest.raises(native.NativeUnavailable, match="no C compiler 'no-such-compiler-molf'"):
        native.load()


def test_build_goes_to_the_cache_directory(fresh_native, tmp_path):
    assert native.available()
    built = list((tmp_path / "cache").glob("molf_cpu_*.so"))
    assert len(built) == 1


def test_explicit_native_refuses_tensors_it_cannot_take():
    model = _model().to(torch.bfloat16)
    optimizer = MoLFAdamW.from_config(model, OPTIM, score_backend="native")
    ids = torch.randint(0, 128, (2, 8))
    model(ids, labels=ids).loss.backward()
    with pytest.raises(ValueError, match="contiguous fp32 CPU experts"):
        optimizer.step()
    with pytest.raises(ValueError, match="CPU only"):
        prepass.resolve_backend("native", torch.device("cuda"))


def test_a_failed_build_is_tried_once_per_process(fresh_native, monkeypatch):
    calls = []
    monkeypatch.setattr(native, "_compiler", lambda: calls.append(1) or "cc")
    monkeypatch.setattr(native, "_build", lambda cc, flags, out: "error: broken compiler")
    for _ in range(3):
        assert not native.available()
    assert len(calls) == 1 and "broken compiler" in native.unavailable_reason()


def test_a_cached_library_that_does_not_load_is_rebuilt(fresh_native, tmp_path):
    assert native.available()
    [built] = list((tmp_path / "cache").glob("molf_cpu_*.so"))
    # The same name in a second cache holds garbage (a foreign or truncated file); the loaded file of the
    # first cache is left alone, as overwriting a mapped library would crash this process.
    fresh_native.setenv("MOLF_NATIVE_CACHE", str(tmp_path / "other"))
    (tmp_path / "other").mkdir()
    cached = tmp_path / "other" / built.name
    cached.write_bytes(b"garbage")
    native._load_once.cache_clear()
    assert native.available()
    assert cached.stat().st_size == built.stat().st_size


def test_a_library_that_never_loads_makes_native_unavailable_not_a_crash(fresh_native, monkeypatch):
    def load_fails(path):
        raise OSError(f"{path}: failed to map segment from shared object")

    monkeypatch.setattr(native.ctypes, "CDLL", load_fails)
    assert not native.available() and "noexec" in native.unavailable_reason()
    assert prepass.resolve_backend("auto", torch.device("cpu")) == "eager"
