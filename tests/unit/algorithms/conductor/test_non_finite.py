"""GradientConductor on a non-finite micro-batch: the cycle is skipped, zeros are returned and the
algorithm state is kept (the statistics describe the skipped cycle, as documented)."""

from __future__ import annotations

import pytest
import torch

from gradfn.algorithms import conductor
from tests._utils.asserts import tree_equal
from tests._utils.problems import fn_batch as _fn_batch
from tests._utils.problems import fn_loss as _fn_loss
from tests._utils.problems import fn_params as _fn_params

# the conductor's algorithm state (its statistics describe the last cycle, skipped or not)
ALGORITHM = ("momentum", "prev", "prev_sq_norms", "norm_ema", "history")


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
