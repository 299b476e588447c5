"""``aggregators.backward``: an aggregator from an ``nn.Module`` loop, writing ``p.grad``."""

from __future__ import annotations

import pytest
import torch

import gradfn.aggregators as A
from tests.unit.aggregators._common import F64


class _TwoHead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(4, 3)
        self.h1 = torch.nn.Linear(3, 1)
        self.h2 = torch.nn.Linear(3, 1)
        self.unused = torch.nn.Linear(2, 2)

    def forward(self, x):
        z = torch.tanh(self.body(x))
        return self.h1(z).sum(), (self.h2(z) ** 2).sum()


@pytest.mark.parametrize("parallel", [True, False])
def test_backward_writes_aggregated_grads(parallel):
    torch.manual_seed(0)
    model = _TwoHead().double()
    x = torch.randn(5, 4, dtype=F64)
    l1, l2 = model(x)
    names = [n for n, _ in model.named_parameters() if not n.startswith("unused")]
    params = [p for n, p in model.named_parameters() if not n.startswith("unused")]
    per = [
        torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in (l1, l2)
    ]
    stacked = {
        n: torch.stack([torch.zeros_like(p) if g[i] is None else g[i] for g in per])
        for i, (n, p) in enumerate(zip(names, params, strict=True))
    }
    _, ref = A.aggregator("upgrad").update(A.EmptyState(), stacked)
    state, out = A.backward([l1, l2], model, "upgrad", parallel=parallel)
    assert state == A.EmptyState()
    for n, p in model.named_parameters():
        if n.startswith("unused"):
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, ref.grad[n])
    torch.testing.assert_close(out.weights, ref.weights)


def test_backward_rejects_non_finite_loss():
    model = _TwoHead()
    l1, l2 = model(torch.randn(2, 4))
    with pytest.raises(ValueError, match="non-finite"):
        A.backward([l1, l2 * float("nan")], model, "mean")
    assert all(p.grad is None for p in model.parameters())
