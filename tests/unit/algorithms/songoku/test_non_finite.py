"""SON-GOKU on a non-finite loss: the step is skipped, zeros are returned and the state is kept
(apart from ``skipped`` and the recorded ``losses``), with and without an in-group aggregator."""

from __future__ import annotations

import pytest
import torch

from gradfn import aggregators
from gradfn.algorithms import songoku
from tests._utils.asserts import tree_equal


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
