"""PCGrad: ``reduction="mean"`` is the sum over the projected gradients divided by the number of
active tasks, both against the naive vector PCGrad with the same visiting orders."""

from __future__ import annotations

import pytest
import torch

import gradfn.aggregators as A
from gradfn._internal.prng import permutations
from tests._utils import oracles
from tests.unit.aggregators._common import F64, jac

MASKS = [
    None,
    [True, True, False, True, True],
    [False, True, True, False, False],
    [True] + [False] * 4,
]


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("seed", [0, 7])
def test_mean_is_the_sum_over_the_active_count(mask, seed):
    j = jac(seed + 3, 5, 11)
    active = None if mask is None else torch.tensor(mask)
    grads = {"w": j}
    total = A.pcgrad(grads, seed=seed, active=active).grad["w"]
    mean = A.pcgrad(grads, seed=seed, active=active, reduction="mean").grad["w"]
    count = 5 if mask is None else sum(mask)
    torch.testing.assert_close(mean, total / count, rtol=1e-12, atol=1e-14)
    # both against the naive PCGrad with the orders drawn from the seed
    order = permutations(seed, 5, 5)
    on = [True] * 5 if mask is None else mask
    for reduction, want in (
        ("sum", oracles.pcgrad(list(j), on, order, mean=False)),
        ("mean", oracles.pcgrad(list(j), on, order, mean=True)),
    ):
        got = A.pcgrad(grads, order=order, active=active, reduction=reduction).grad["w"]
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_mean_through_the_aggregator_advances_like_the_sum():
    sums, means = A.aggregator("pcgrad", seed=2), A.aggregator("pcgrad", seed=2, reduction="mean")
    s1, s2 = sums.init(4), means.init(4)
    active = torch.tensor([True, False, True, True])
    for step in range(3):
        rows = {"w": jac(step, 4, 6)}
        s1, a = sums.update(s1, rows, active=active)
        s2, b = means.update(s2, rows, active=active)
        torch.testing.assert_close(b.grad["w"], a.grad["w"] / 3, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b.weights, a.weights / 3, rtol=1e-12, atol=1e-14)
    assert int(s1.count) == int(s2.count) == 3


def test_reduction_is_checked():
    with pytest.raises(ValueError, match="reduction"):
        A.pcgrad_weights(torch.eye(2, dtype=F64), reduction="max")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_two_tasks_match_the_k_space_loop_and_a_naive_projection(seed, reduction):
    # K = 2 takes a closed form; the masked path (all active) runs the general loop
    g = torch.Generator().manual_seed(seed)
    j = torch.randn(2, 7, generator=g, dtype=torch.float64)
    if seed % 2:
        j[1] = -0.7 * j[0] + 0.3 * j[1]  # a conflict
    gram = j @ j.T
    w = A.pcgrad_weights(gram, reduction=reduction)
    w_loop = A.pcgrad_weights(gram, reduction=reduction, active=torch.ones(2, dtype=torch.bool))
    torch.testing.assert_close(w, w_loop)
    out = []
    for i in range(2):  # Yu et al.: project g_i off the other task if they conflict
        gi, gj = j[i].clone(), j[1 - i]
        if gi @ gj < 0:
            gi = gi - (gi @ gj) / (gj @ gj) * gj
        out.append(gi)
    naive = (out[0] + out[1]) / (2 if reduction == "mean" else 1)
    torch.testing.assert_close(w @ j, naive)
