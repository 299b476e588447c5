"""SON-GOKU on a non-finite loss: the step is skipped, zeros are returned and the state is kept
(apart from ``skipped`` and the recorded ``losses``), with and without an in-group aggregator."""

from __future__ import annotations

import pytest
import torch

from gradfn import aggregators
from gradfn.algorithms import songoku
from tests._utils.asserts import tree_equal
from tests._utils.problems import fn_batch as _fn_batch
from tests._utils.problems import fn_loss as _fn_loss
from tests._utils.problems import fn_params as _fn_params


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(ema_mode="refresh"),
        dict(sketch_dim=8, aggregator=aggregators.aggregator("pcgrad", reduction="mean")),
        dict(aggregator="upgrad"),
    ],
)
def test_songoku_functional_non_finite_step_keeps_state(value, kw):
    tx = songoku(_fn_loss, num_tasks=3, shared=["trunk"], refresh_period=2, **kw)
    params = _fn_params()
    state = tx.init(params)
    for t in range(3):
        state, _ = tx.update(state, params, _fn_batch(t))
    for bad_step in range(2):  # one plain step, one that would trigger a refresh
        task = int(torch.nonzero(state.groups[state.group_index])[0])  # an active task's loss
        new, grads = tx.update(state, params, _fn_batch(10 + bad_step, bad=value, task=task))
        assert bool(new.skipped)
        for name, g in grads.items():
            assert torch.equal(g, torch.zeros_like(g)), name
        for key, a in state._asdict().items():
            if key not in ("skipped", "losses"):  # the skipped step's losses are recorded
                assert tree_equal(a, getattr(new, key)), key
        state, _ = tx.update(state, params, _fn_batch(20 + bad_step))
