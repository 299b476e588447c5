"""GradientConductor on a non-finite micro-batch: the cycle is skipped, zeros are returned and the
algorithm state is kept (the statistics describe the skipped cycle, as documented)."""

from __future__ import annotations

import pytest
import torch

from gradfn.algorithms import conductor
from tests._utils.asserts import tree_equal

# the conductor's algorithm state (its statistics describe the last cycle, skipped or not)
ALGORITHM = ("momentum", "prev", "prev_sq_norms", "norm_ema", "history")


def _fn_loss(params, batch):
    x, ys = batch
    h = torch.tanh(x @ params["trunk"].T)
    return [((h @ params["heads"][k] - ys[:, k]) ** 2).mean() for k in range(3)]


def _fn_params():
    g = torch.Generator().manual_seed(3)
    return {"trunk": torch.randn(8, 5, generator=g), "heads": torch.randn(3, 8, generator=g)}


def _fn_batch(seed, bad=None, task=1):
    g = torch.Generator().manual_seed(seed)
    x, ys = torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)
    if bad is not None:
        ys[:, task] = bad
    return x, ys


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("stochastic", [True, False])
def test_conductor_functional_non_finite_cycle_keeps_state(value, stochastic):
    tx = conductor(_fn_loss, [1.0, 0.5, 0.25], accumulation_steps=3, stochastic=stochastic)
    params = _fn_params()
    state = tx.init(params)
    for c in range(2):
        state, _ = tx.update(state, params, [_fn_batch(3 * c + i) for i in range(3)])
    mbs = [_fn_batch(50), _fn_batch(51, bad=value), _fn_batch(52)]
    new, grads = tx.update(state, params, mbs)
    assert bool(new.skipped) and int(new.num_skipped) == int(state.num_skipped) + 1
    for name, g in grads.items():
        assert torch.equal(g, torch.zeros_like(g)), name
    for key in ALGORITHM:  # the statistics describe the skipped cycle (documented)
        assert tree_equal(getattr(state, key), getattr(new, key)), key
