"""The inverse-norm weighting (SON-GOKU's reference "adatask") against the hand formula of its
module docstring, over several steps with an active mask."""

from __future__ import annotations

import pytest
import torch

import gradfn.aggregators as A
from tests._utils import oracles
from tests.unit.aggregators._common import F64

STEPS = [
    [True, True, True, True],
    [True, False, True, False],
    [False, True, False, True],
    [True, True, False, False],
    [False, False, True, True],
    [True, True, True, True],
]


@pytest.mark.parametrize("beta", [0.9, 0.5, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_matches_the_hand_formula_over_steps(beta, dtype):
    agg = A.aggregator("inverse_norm", beta=beta)
    state = agg.init(4)
    assert torch.equal(state.norm_ema, torch.zeros(4))
    ema: list[float | None] = [None] * 4
    g = torch.Generator().manual_seed(5)
    scales = torch.tensor([[0.1], [1.0], [3.0], [30.0]], dtype=dtype)
    for mask in STEPS:
        rows = torch.randn(4, 6, generator=g, dtype=dtype) * scales
        active = torch.tensor(mask)
        state, out = agg.update(state, {"w": rows}, active=active)
        norms = [float(r.double().norm()) for r in rows]
        want = oracles.inverse_norm_weights(norms, mask, ema, beta)
        tol = 1e-13 if dtype == F64 else 1e-5  # float64 gradients: a float64 norm EMA
        torch.testing.assert_close(out.weights, torch.tensor(want, dtype=dtype), rtol=tol, atol=0)
        seen = torch.tensor([0.0 if e is None else e for e in ema], dtype=dtype)
        torch.testing.assert_close(state.norm_ema, seen, rtol=tol / 10, atol=0)
        assert float(out.weights[active].mean()) == pytest.approx(1.0, rel=1e-6)
        want_grad = sum(w * r for w, r in zip(want, rows.double(), strict=True))
        torch.testing.assert_close(out.grad["w"].double(), want_grad, rtol=1e-5, atol=1e-7)


def test_the_largest_gradient_gets_the_smallest_weight():
    rows = torch.diag(torch.tensor([1.0, 2.0, 4.0]))
    _, out = A.aggregator("inverse_norm").update(A.inverse_norm_init(3), {"w": rows})
    # first step: ema = norms, w ∝ 1/norm with mean 1
    inv = torch.tensor([1.0, 0.5, 0.25])
    torch.testing.assert_close(out.weights, inv * 3 / (inv.sum() + 1e-8))
