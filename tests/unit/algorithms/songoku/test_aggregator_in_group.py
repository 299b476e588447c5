"""A stateful aggregator inside SON-GOKU's active group: its state lives in
``SonGokuState.aggregator`` and the step's gradient is what a naive loop gets by applying the same
aggregator to the active tasks' gradients (``weight_heads``: its weights also scale the heads;
``reduction="mean"``: divided by the group's size)."""

from __future__ import annotations

import pytest
import torch

from gradfn import aggregators
from gradfn.algorithms import songoku
from tests._utils.asserts import tree_equal
from tests.unit.algorithms.songoku._linear import batches, linear_loss, make_params, planted

K = 4


def _assert_states_close(a, b):
    assert type(a) is type(b)
    for x, y in zip(a, b, strict=True):
        if x.is_floating_point():
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
        else:
            assert torch.equal(x, y)


@pytest.mark.parametrize("method", ["gradvac", "nash_mtl"])
@pytest.mark.parametrize("weight_heads", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_stateful_aggregator_matches_a_naive_loop(method, weight_heads, reduction):
    dirs, _ = planted(k_per_group=2, groups=2, seed=1, noise=0.3)
    agg = aggregators.aggregator(method)
    tx = songoku(
        linear_loss(dirs),
        num_tasks=K,
        shared=["w"],
        refresh_period=3,
        tau_schedule=0.0,
        aggregator=agg,
        weight_heads=weight_heads,
        reduction=reduction,
    )
    params = make_params(K, seed=2)
    state = tx.init(params)
    naive = agg.init(K)
    assert tree_equal(state.aggregator, naive)
    sizes = set()
    for b in batches(K, 9, scale=0.4):
        active = state.groups[state.group_index].clone()
        sizes.add(int(active.sum()))
        state, grads = tx.update(state, params, b)
        # naive: the aggregator on the K task gradients, the inactive ones masked out
        naive, out = agg.update(naive, {"w": dirs + b}, active=active)
        n = int(active.sum()) if reduction == "mean" else 1
        torch.testing.assert_close(grads["w"], out.grad["w"] / n, rtol=1e-9, atol=1e-12)
        _assert_states_close(state.aggregator, naive)
        for i in range(K):
            own = (1 + i) * params[f"h{i}"]  # ∇_{h_i} L_i
            scale = (float(out.weights[i]) if weight_heads else 1.0) / n
            want = scale * own if active[i] else torch.zeros_like(own)
            torch.testing.assert_close(grads[f"h{i}"], want, rtol=1e-9, atol=1e-12)
    assert sizes == {2, K}  # joint warm-up, then the two planted groups
    assert int(state.refreshes) == 3


def test_aggregator_by_name_gets_its_state_in_the_songoku_state():
    dirs, _ = planted(k_per_group=1, groups=3)
    tx = songoku(linear_loss(dirs), num_tasks=3, shared=["w"], aggregator="gradvac")
    state = tx.init(make_params(3))
    assert isinstance(state.aggregator, aggregators.GradVacState)
    assert state.aggregator.phi.shape == (3, 3)
    state, _ = tx.update(state, make_params(3), batches(3, 1)[0])
    assert int(state.aggregator.count) == 1
    assert bool(state.aggregator.phi.any())
