"""The SON-GOKU algorithm object and its options: a frozen dataclass (copy, replace, unpacking),
checked options, ``refresh_due`` and the ``apply`` hook of the driver, against hand computations."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from gradfn.algorithms import Algorithm, SonGoku, SonGokuConfig, songoku
from gradfn.conflict import GraphRule
from tests._utils.asserts import tree_equal
from tests.unit.algorithms.songoku._linear import (
    D,
    batches,
    linear_loss,
    make_params,
    planted,
)


def _two_losses(p, b):
    return [p["w"].sum() ** 2, (p["w"] - 1).pow(2).sum()]


def _tx(**kw):
    dirs, _ = planted(k_per_group=1, groups=3)
    return songoku(linear_loss(dirs), num_tasks=3, shared=["w"], refresh_period=2, **kw)


def _run(tx, n=5):
    params = make_params(3)
    state = tx.init(params)
    out = []
    for b in batches(3, n):
        state, grads = tx.update(state, params, b)
        out.append((state, grads))
    return out


def test_songoku_is_a_frozen_algorithm_that_unpacks():
    tx = _tx()
    assert isinstance(tx, SonGoku) and isinstance(tx, Algorithm)
    init, update = tx
    assert init is tx.init and update is tx.update
    with pytest.raises(dataclasses.FrozenInstanceError):
        tx.update = None  # type: ignore[misc]
    # unpacked, the two functions run the same trajectory
    params = make_params(3)
    s1, s2 = tx.init(params), init(params)
    for b in batches(3, 4):
        s1, g1 = tx.update(s1, params, b)
        s2, g2 = update(s2, params, b)
        assert tree_equal(g1, g2)
    assert tree_equal(s1, s2)


def test_copy_and_replace():
    tx = _tx()
    shallow = copy.copy(tx)
    assert shallow == tx and shallow is not tx
    assert all(getattr(shallow, f.name) is getattr(tx, f.name) for f in dataclasses.fields(tx))
    assert tree_equal(_run(shallow), _run(tx))
    calls = []

    def logged(state, params, batch, *args, **kw):
        calls.append(int(state.step))
        return tx.update(state, params, batch, *args, **kw)

    wrapped = dataclasses.replace(tx, update=logged)
    assert isinstance(wrapped, SonGoku)
    assert wrapped.step is tx.step and wrapped.config is tx.config and wrapped.init is tx.init
    assert tree_equal(_run(wrapped), _run(tx))
    assert calls == [0, 1, 2, 3, 4]


def test_unknown_option_names_raise_type_error_naming_them():
    with pytest.raises(TypeError, match="refresh_perod"):
        songoku(_two_losses, num_tasks=2, refresh_perod=3)
    with pytest.raises(TypeError, match=r"ema_betta.*tau") as err:
        songoku(_two_losses, num_tasks=2, ema_betta=0.5, tau=0.1)
    assert "refresh_period" in str(err.value)  # the valid names are listed
    with pytest.raises(TypeError, match="graph"):
        songoku(_two_losses, num_tasks=2, graph=GraphRule(), graph_rule="knn")
    with pytest.raises(TypeError, match="config"):
        songoku(_two_losses, SonGokuConfig(num_tasks=2), refresh_period=3)
    with pytest.raises(TypeError, match="config"):
        songoku(_two_losses, {"num_tasks": 2})


def test_flat_graph_options_build_the_graph_rule():
    tx = songoku(_two_losses, num_tasks=2, graph_rule="knn", graph_knn_k=1, graph_density=0.5)
    assert tx.config.graph == GraphRule("knn", knn_k=1, density=0.5)
    given = songoku(_two_losses, num_tasks=2, graph=GraphRule("signed"))
    assert given.config.graph == GraphRule("signed")


@pytest.mark.parametrize("seed", [1.5, "0", None, True])
def test_songoku_rejects_a_non_integer_seed(seed):
    with pytest.raises((ValueError, TypeError), match="seed"):
        songoku(_two_losses, num_tasks=2, seed=seed)


def test_songoku_rejects_an_unknown_strategy_when_built():
    with pytest.raises(ValueError, match="strategy"):
        songoku(_two_losses, num_tasks=2, strategy="vamp")


@pytest.mark.parametrize("period", [1, 3, 4])
def test_refresh_due_says_whether_the_next_update_refreshes(period):
    dirs, _ = planted(k_per_group=1, groups=3)
    tx = songoku(linear_loss(dirs), num_tasks=3, shared=["w"], refresh_period=period)
    params = make_params(3)
    state = tx.init(params)
    data = batches(3, 10)
    bad = torch.full((3, D), float("nan"), dtype=torch.float64)
    seen = []
    for t, b in enumerate(data):
        if t == 5:  # a skipped step: no refresh, the step count does not move
            due = tx.refresh_due(state)
            skipped, _ = tx.update(state, params, bad)
            assert bool(skipped.skipped) and int(skipped.refreshes) == int(state.refreshes)
            assert tx.refresh_due(skipped) == due
            state = skipped
        due = tx.refresh_due(state)
        assert isinstance(due, bool)
        assert due == ((int(state.step) + 1) % period == 0)  # by hand
        before = int(state.refreshes)
        state, _ = tx.update(state, params, b)
        assert int(state.refreshes) == before + int(due)
        seen.append(due)
    assert sum(seen) == 10 // period


def _quadratic(centres):
    """``L_k = ½‖w − c_k − b_k‖²``: ``∇_w L_k = w − c_k − b_k`` depends on the parameters."""

    def loss(params, batch):
        w = params["w"]
        return torch.stack([0.5 * ((w - centres[k] - batch[k]) ** 2).sum() for k in range(2)])

    return loss


def test_apply_runs_between_the_step_and_the_refresh():
    g = torch.Generator().manual_seed(9)
    centres = torch.randn(2, D, generator=g, dtype=torch.float64)
    tx = songoku(_quadratic(centres), num_tasks=2, refresh_period=1, ema_beta=0.5)
    params = {"w": torch.randn(D, generator=g, dtype=torch.float64)}
    batch = 0.1 * torch.randn(2, D, generator=g, dtype=torch.float64)
    fresh = 0.1 * torch.randn(2, D, generator=g, dtype=torch.float64)
    state = tx.init(params)
    log = []
    w0 = params["w"].clone()

    def apply(st, grads):
        log.append(("apply", int(st.step), int(st.refreshes)))
        assert not bool(st.skipped)
        torch.testing.assert_close(grads["w"], (2 * w0 - centres.sum(0) - batch.sum(0)))
        params["w"].sub_(0.25 * grads["w"])  # an optimizer step, in place

    def refresh_batch():
        log.append(("refresh_batch", None, None))
        return fresh

    new, grads = tx.update(state, params, batch, refresh_batch, apply=apply)
    assert log == [("apply", 1, 0), ("refresh_batch", None, None)]
    assert int(new.refreshes) == 1
    # the EMA: the step's gradients at w0, then the refresh batch's at the updated parameters
    w1 = w0 - 0.25 * grads["w"]
    torch.testing.assert_close(params["w"], w1)
    step_ema = 0.5 * (w0 - centres - batch)
    want = 0.5 * step_ema + 0.5 * (w1 - centres - fresh)
    torch.testing.assert_close(new.ema["w"], want)
    assert new.ema_count.tolist() == [2, 2]
    # no refresh due: apply still runs, the refresh batch is never asked for
    log.clear()
    tx4 = songoku(_quadratic(centres), num_tasks=2, refresh_period=4)
    tx4.update(tx4.init(params), params, batch, refresh_batch, apply=lambda st, gr: log.append(1))
    assert log == [1]


def test_refresh_with_an_empty_probe_only_recolours():
    dirs, _ = planted(k_per_group=1, groups=3)
    tx = songoku(linear_loss(dirs), num_tasks=3, shared=["w"], refresh_period=5)
    params = make_params(3)
    state, _ = tx.update(tx.init(params), params, batches(3, 1)[0])
    nobody = torch.zeros(3, dtype=torch.bool)
    new = tx.refresh(state, params, batches(3, 1, seed=4)[0], nobody)
    assert tree_equal(new.ema, state.ema) and torch.equal(new.ema_count, state.ema_count)
    assert int(new.refreshes) == int(state.refreshes) + 1
    assert tree_equal(new, tx.refresh(state, params))  # the same as a refresh without a batch
