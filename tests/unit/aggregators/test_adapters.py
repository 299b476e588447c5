"""``aggregators.backward``: an aggregator from an ``nn.Module`` loop, writing ``p.grad``."""

from __future__ import annotations

import pytest
import torch

import gradfn.aggregators as A
from tests._utils.models import TrunkHeads
from tests.unit.aggregators._common import F64


def two_losses(model: TrunkHeads, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two losses on the heads of a two-head model (its ``unused`` layer reached by neither)."""
    y1, y2 = model.head_outputs(x)
    return y1.sum(), (y2**2).sum()


@pytest.mark.parametrize("parallel", [True, False])
def test_backward_writes_aggregated_grads(parallel):
    model = TrunkHeads(4, 3, 2, unused=True, dtype=F64, seed=0)
    x = torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    l1, l2 = two_losses(model, x)
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
    model = TrunkHeads(4, 3, 2, unused=True, seed=0)
    l1, l2 = two_losses(model, torch.randn(2, 4))
    with pytest.raises(ValueError, match="non-finite"):
        A.backward([l1, l2 * float("nan")], model, "mean")
    assert all(p.grad is None for p in model.parameters())
