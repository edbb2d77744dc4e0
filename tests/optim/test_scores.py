import math

import pytest
import torch

from molf.optim.scores import SCORE_EPS, get_score_fn, pfn_combine, select_topk

M1, V1 = torch.tensor([0.1, -0.2, 0.3]), torch.tensor([0.04, 0.01, 0.09])
M2, V2 = torch.tensor([[0.5], [0.0]]), torch.tensor([[0.25], [1.0]])


def _hand_epd(lr):
    terms = [m * m / (math.sqrt(v) + SCORE_EPS) for m, v in zip((*M1.tolist(), *M2.flatten().tolist()),
                                                                (*V1.tolist(), *V2.flatten().tolist()))]
    return lr / 5 * sum(terms)


def _hand_pfn():
    terms = [(m / (math.sqrt(v) + SCORE_EPS)) ** 2 for m, v in zip((*M1.tolist(), *M2.flatten().tolist()),
                                                                   (*V1.tolist(), *V2.flatten().tolist()))]
    return math.sqrt(sum(terms)) / math.sqrt(5)


def _score(name, lr):
    fn = get_score_fn(name)
    per_tensor = fn.tensor_sums([M1, M2], [V1.sqrt(), V2.sqrt()], SCORE_EPS)  # one expert of two tensors
    assert per_tensor.shape == (2,) and per_tensor.dtype == torch.float32
    return fn.combine(per_tensor.sum().view(1, 1), torch.full((1, 1), 5.0), torch.full((1, 1), lr)).item()


def test_epd_by_hand():
    assert _score("true_projected", 2e-4) == pytest.approx(_hand_epd(2e-4), rel=1e-5)


def test_pfn_by_hand():
    assert _score("projected", 2e-4) == pytest.approx(_hand_pfn(), rel=1e-5)


def test_epd_scales_with_lr_pfn_does_not():
    assert _score("true_projected", 3e-4) == pytest.approx(3 * _score("true_projected", 1e-4), rel=1e-6)
    assert _score("projected", 3e-4) == _score("projected", 1e-4)


def test_epd_is_zero_at_zero_lr():
    assert _score("true_projected", 0.0) == 0.0


def test_unknown_score_raises():
    with pytest.raises(ValueError, match="true_projected"):
        get_score_fn("gradient_norm")


def test_pfn_combine_shapes():
    out = pfn_combine(torch.tensor([[4.0, 9.0]]), torch.tensor([[1.0, 9.0]]), torch.zeros(1, 2))
    torch.testing.assert_close(out, torch.tensor([[2.0, 1.0]]))


def test_topk_ties_go_to_lower_index():
    scores = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0], [3.0, 3.0, 1.0]])
    assert select_topk(scores, 1).tolist() == [[True, False, False], [False, True, False], [True, False, False]]
    assert select_topk(scores, 2).tolist() == [[True, True, False], [False, True, True], [True, True, False]]


def test_non_finite_never_wins():
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([[nan, 1.0, 0.5], [inf, -inf, 2.0], [nan, nan, -inf]])
    assert select_topk(scores, 1).tolist() == [[False, True, False], [False, False, True], [False, False, False]]
    assert select_topk(scores, 3).tolist() == [[False, True, True], [False, False, True], [False, False, False]]


def test_topk_at_least_experts_selects_all_finite():
    scores = torch.rand(4, 3)
    assert select_topk(scores, 3).all() and select_topk(scores, 5).all()
