"""``tasks=`` (a subset of the tasks) and ``return_usage=True`` (which parameters each task's loss
reaches) of the per-task gradient engine, against the full result and against one
``torch.autograd.grad(..., allow_unused=True)`` per task on the module itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradfn.autodiff import (
    accumulate_per_task_grads,
    functional_loss,
    value_and_per_task_grads,
    value_and_weighted_grad,
)
from tests._utils.models import TrunkHeads

K = 4


def make_model() -> TrunkHeads:
    """Trunk for all, a ``pair`` layer for tasks 0 and 1, one head each, an unused layer, a
    frozen input layer (never differentiated)."""
    return TrunkHeads(5, 6, K, partial=2, unused=True, frozen_input=True, seed=11)


def task_losses(model: nn.Module, batch) -> list[torch.Tensor]:
    x, y = batch
    return [((out.squeeze(-1) - y[k]) ** 2).mean() for k, out in enumerate(model.head_outputs(x))]


def make_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(7, 5, generator=g), torch.randn(K, 7, generator=g)


def oracle_usage(model: nn.Module, batch, names: list[str]) -> torch.Tensor:
    """(K, P) bool: ``autograd.grad(L_k, p, allow_unused=True) is not None``, one forward each."""
    params = dict(model.named_parameters())
    rows = []
    for k in range(K):
        loss = task_losses(model, batch)[k]
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        rows.append([g is not None for g in grads])
    return torch.tensor(rows)


def as_matrix(usage: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    assert list(usage) == names
    for n in names:
        assert usage[n].dtype == torch.bool and usage[n].device.type == "cpu"
    return torch.stack([usage[n] for n in names], dim=-1)


def test_the_model_has_every_kind_of_usage():
    model = make_model()
    params, _ = functional_loss(model, task_losses)
    want = oracle_usage(model, make_batch(), list(params))
    names = list(params)
    col = {n: want[:, names.index(n)].tolist() for n in names}
    assert col["trunk.0.weight"] == [True] * K
    assert col["pair.weight"] == [True, True, False, False]
    assert col["heads.2.weight"] == [False, False, True, False]
    assert col["unused.weight"] == [False] * K
    assert "frozen.weight" not in params


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("tasks", [[2, 0], [3], [0, 1, 2, 3], torch.tensor([1, 3])])
def test_tasks_rows_equal_the_rows_of_the_full_result(strategy, tasks):
    model = make_model()
    params, f = functional_loss(model, task_losses)
    batch = make_batch(1)
    losses, full = value_and_per_task_grads(f, params, batch, strategy=strategy)
    sub_losses, sub = value_and_per_task_grads(f, params, batch, strategy=strategy, tasks=tasks)
    idx = tasks.tolist() if isinstance(tasks, torch.Tensor) else tasks
    assert sub_losses.shape == (K,)  # the losses of every task
    torch.testing.assert_close(sub_losses, losses, rtol=0, atol=0)
    for n in params:
        assert sub[n].shape == (len(idx), *params[n].shape)
        torch.testing.assert_close(sub[n], full[n][idx], rtol=1e-6, atol=1e-7)


def _task_batched():
    g = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(4, 3, generator=g), "v": torch.randn(4, generator=g)}
    batch = {"x": torch.randn(K, 6, 3, generator=g), "y": torch.randn(K, 6, generator=g)}

    def loss(p, b):
        return ((torch.tanh(b["x"] @ p["w"].T) @ p["v"] - b["y"]) ** 2).mean()

    return loss, params, batch


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_task_batched_subset_rows_equal_the_full_rows(strategy):
    loss, params, batch = _task_batched()
    _losses, full = value_and_per_task_grads(
        loss, params, batch, task_batched=True, strategy=strategy
    )
    out = value_and_per_task_grads(
        loss, params, batch, task_batched=True, strategy=strategy, tasks=[3, 1]
    )
    for n in params:
        torch.testing.assert_close(out[1][n], full[n][[3, 1]], rtol=1e-6, atol=1e-7)
    # usage is not read in the task-batched form (documented)
    out = value_and_per_task_grads(
        loss, params, batch, task_batched=True, strategy=strategy, tasks=[3, 1], return_usage=True
    )
    assert out[2] is None


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_task_batched_subset_evaluates_only_those_tasks(strategy):
    """``tasks=`` with ``task_batched``: "only the R tasks' batches are evaluated, and their R
    losses are returned" (value_and_per_task_grads' docstring), in the order given."""
    loss, params, batch = _task_batched()
    losses, _ = value_and_per_task_grads(loss, params, batch, task_batched=True, strategy=strategy)
    sub_losses, _ = value_and_per_task_grads(
        loss, params, batch, task_batched=True, strategy=strategy, tasks=[3, 1]
    )
    assert sub_losses.shape == (2,)
    torch.testing.assert_close(sub_losses, losses[[3, 1]])


def test_tasks_out_of_range_is_an_error():
    model = make_model()
    params, f = functional_loss(model, task_losses)
    with pytest.raises(ValueError, match="tasks"):
        value_and_per_task_grads(f, params, make_batch(), tasks=[K])
    with pytest.raises(ValueError, match="tasks"):
        value_and_per_task_grads(f, params, make_batch(), tasks=[True])


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("tasks", [None, [3, 0, 2]])
def test_return_usage_matches_autograd_none_grads(strategy, tasks):
    model = make_model()
    params, f = functional_loss(model, task_losses)
    batch = make_batch(2)
    names = list(params)
    want = oracle_usage(model, batch, names)
    if tasks is not None:
        want = want[tasks]
    _losses, grads, usage = value_and_per_task_grads(
        f, params, batch, strategy=strategy, tasks=tasks, return_usage=True
    )
    assert torch.equal(as_matrix(usage, names), want)
    # an unreached parameter's rows are zeros
    for j, n in enumerate(names):
        for r in range(want.shape[0]):
            if not want[r, j]:
                assert not bool(grads[n][r].any()), (n, r)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_return_usage_with_wrt_covers_the_selected_parameters(strategy):
    model = make_model()
    params, f = functional_loss(model, task_losses)
    batch = make_batch(3)
    selected = [n for n in params if not n.startswith("trunk.")]
    _, _, usage = value_and_per_task_grads(
        f, params, batch, wrt=lambda n: n in selected, strategy=strategy, return_usage=True
    )
    assert torch.equal(as_matrix(usage, selected), oracle_usage(model, batch, selected))


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_accumulate_return_usage_matches_autograd_none_grads(strategy):
    model = make_model()
    params, f = functional_loss(model, task_losses)
    batch = make_batch(4)
    into = {n: torch.zeros((K, *p.shape)) for n, p in params.items()}
    losses, usage = accumulate_per_task_grads(
        f, params, batch, into, strategy=strategy, return_usage=True
    )
    assert losses.shape == (K,)
    names = list(params)
    assert torch.equal(as_matrix(usage, names), oracle_usage(model, batch, names))


def test_weighted_grad_return_usage_matches_autograd_none_grads():
    model = make_model()
    params, f = functional_loss(model, task_losses)
    batch = make_batch(5)
    names = list(params)
    per_task = oracle_usage(model, batch, names)
    w = torch.tensor([0.5, 1.0, 2.0, 1.5])
    _, grads, usage = value_and_weighted_grad(f, params, batch, w, return_usage=True)
    assert all(usage[n].shape == () and usage[n].dtype == torch.bool for n in names)
    got = torch.stack([usage[n] for n in names])
    assert torch.equal(got, per_task.any(dim=0))  # Σ_k w_k L_k reaches what some L_k reaches
    assert not bool(grads["unused.weight"].any())
    # weights with zeros: losses of weight 0 are left out of the backward (a NaN there must not
    # reach the gradient), so the oracle is the backward of the weight-1 loss alone
    w0 = torch.tensor([0.0, 0.0, 1.0, 0.0])
    _, _, usage0 = value_and_weighted_grad(f, params, batch, w0, return_usage=True)
    mp = dict(model.named_parameters())
    total = task_losses(model, batch)[2]
    ref = torch.autograd.grad(total, [mp[n] for n in names], allow_unused=True)
    assert [bool(usage0[n]) for n in names] == [g is not None for g in ref]


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_an_empty_task_subset_gives_zero_rows(strategy):
    """``tasks=[]``: R = 0 rows (every strategy gives the same result), the K losses."""
    model = make_model()
    params, f = functional_loss(model, task_losses)
    batch = make_batch(6)
    losses, _ = value_and_per_task_grads(f, params, batch, strategy=strategy)
    sub_losses, grads, usage = value_and_per_task_grads(
        f, params, batch, strategy=strategy, tasks=[], return_usage=True
    )
    torch.testing.assert_close(sub_losses, losses, rtol=0, atol=0)
    for n, p in params.items():
        assert grads[n].shape == (0, *p.shape)
        assert usage[n].shape == (0,)
