"""``autodiff.gramian``: the Gramian folded leaf by leaf equals the rows' Gramian from a naive
per-task loop (float64), on an MLP and a small CNN, with tied, partly reached and unused
parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradfn.autodiff import gramian
from gradfn.autodiff._gramian import stream_gramian

F64 = torch.float64


def naive_gramian(losses: list[torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
    """One ``autograd.grad`` per task, zero rows where a task does not reach a parameter, and
    every entry ``⟨g_k, g_l⟩`` as its own dot product."""
    rows = []
    for loss in losses:
        gs: tuple = (None,) * len(params)
        if loss.requires_grad:
            gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for g, p in zip(gs, params, strict=True)
                ]
            )
        )
    k = len(rows)
    return torch.tensor([[float(rows[i] @ rows[j]) for j in range(k)] for i in range(k)], dtype=F64)


def mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 5))
    return model.to(F64), torch.randn(9, 5, dtype=F64)


def cnn() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    )
    return model.to(F64), torch.randn(6, 2, 6, 6, dtype=F64)


def task_losses(out: torch.Tensor, k: int) -> list[torch.Tensor]:
    return [((i + 1.0) * out[:, i % out.shape[1]]).sin().sum() for i in range(k)]


@pytest.mark.parametrize("build", [mlp, cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_gramian_equals_the_rows_gramian(build, k):
    model, x = build()
    params = list(model.parameters())
    losses = task_losses(model(x), k)
    got = gramian(losses, params, retain_graph=True)
    assert got.shape == (k, k) and got.dtype == F64
    torch.testing.assert_close(got, naive_gramian(losses, params), rtol=1e-12, atol=1e-12)


def test_tied_partly_reached_and_unused_parameters():
    torch.manual_seed(2)
    w = torch.randn(4, 4, dtype=F64, requires_grad=True)  # used twice: its gradient is a sum
    a = torch.randn(4, dtype=F64, requires_grad=True)  # reached by task 1 only
    unused = torch.randn(3, dtype=F64, requires_grad=True)
    x = torch.randn(5, 4, dtype=F64)
    h = torch.tanh(torch.tanh(x @ w) @ w)
    losses = [h.sum(), (h @ a).pow(2).sum(), torch.ones((), dtype=F64)]  # task 2 reaches nothing
    params = [w, a, unused]
    out = stream_gramian(losses, params, retain_graph=True)
    assert out.reached == [True, True, False]
    torch.testing.assert_close(out.gram, naive_gramian(losses, params), rtol=1e-12, atol=1e-12)
    assert torch.all(out.gram[2] == 0)


def test_summed_leaves_get_the_sum_of_the_task_gradients():
    torch.manual_seed(3)
    trunk = torch.randn(3, 4, dtype=F64, requires_grad=True)
    heads = [torch.randn(4, dtype=F64, requires_grad=True) for _ in range(3)]
    h = torch.tanh(torch.randn(6, 3, dtype=F64) @ trunk)
    losses = [(h @ v).exp().mean() for v in heads]
    out = stream_gramian(losses, [trunk], heads, retain_graph=True)
    for i, v in enumerate(heads):
        want = torch.autograd.grad(losses[i], v, retain_graph=True)[0]
        torch.testing.assert_close(out.sums[i], want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.gram, naive_gramian(losses, [trunk]), rtol=1e-12, atol=1e-12)


def test_float32_leaves_give_a_float32_gramian():
    model, x = mlp()
    model.float()
    losses = task_losses(model(x.float()), 3)
    got = gramian(torch.stack(losses), list(model.parameters()), retain_graph=True)
    assert got.dtype == torch.float32
    want = naive_gramian(losses, list(model.parameters()))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_without_retain_graph_the_graph_is_freed():
    model, x = mlp()
    losses = task_losses(model(x), 2)
    gramian(losses, list(model.parameters()))
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(losses[0], list(model.parameters()))


def test_bad_input():
    p = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="losses"):
        gramian([], [p])
    with pytest.raises(ValueError, match="losses"):
        gramian([p * 2], [p])  # not a scalar
    with pytest.raises(TypeError, match="inputs"):
        gramian([p.sum()], p)
    with pytest.raises(ValueError, match="inputs"):
        gramian([p.sum()], [])
    with pytest.raises(ValueError, match="requires grad"):
        gramian([p.sum()], [torch.ones(2)])
    with pytest.raises(ValueError, match="leaf"):
        gramian([(p * 2).sum()], [p * 2])
    with pytest.raises(ValueError, match="twice"):
        gramian([p.sum()], [p, p])
