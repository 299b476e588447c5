"""FairGrad (arXiv:2402.15638, Eq. 4): against TorchJD 0.18's ``FairGradWeighting`` (scipy's
``least_squares`` on the same equation), closed forms and the α-fair scaling."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradfn.aggregators as A
from tests.unit.aggregators._common import CASES, F64, jac


@pytest.mark.parametrize(("seed", "k", "n"), CASES)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0, 5.0])
def test_matches_torchjd(seed, k, n, alpha):
    from torchjd.aggregation import FairGradWeighting

    g = jac(seed, k, n)
    g = g @ g.T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = FairGradWeighting(alpha=alpha)(g)
    mine = A.fairgrad_weights(g, alpha=alpha)
    torch.testing.assert_close(mine, ref, rtol=1e-6, atol=1e-9)


@given(st.integers(0, 10_000), st.integers(1, 6), st.sampled_from([0.3, 1.0, 3.0]))
def test_solves_the_fairness_equation_and_scales(seed, k, alpha):
    j = jac(seed, k, k + 3)  # full row rank: every task has a solution
    g = j @ j.T
    w = A.fairgrad_weights(g, alpha=alpha)
    assert bool((w > 0).all())
    torch.testing.assert_close(g @ w, w.pow(-1.0 / alpha), rtol=1e-7, atol=0)
    # w(cG) = c^{−α/(α+1)} w(G)
    torch.testing.assert_close(
        A.fairgrad_weights(9.0 * g, alpha=alpha),
        w * 9.0 ** (-alpha / (alpha + 1)),
        rtol=1e-7,
        atol=0,
    )


def test_closed_forms():
    diag = torch.diag(torch.tensor([4.0, 0.25, 1.0], dtype=F64))
    # orthogonal gradients: G_kk w_k = w_k^{−1/α} → w_k = G_kk^{−α/(α+1)}
    torch.testing.assert_close(
        A.fairgrad_weights(diag, alpha=2.0), torch.tensor([4.0, 0.25, 1.0], dtype=F64) ** (-2 / 3)
    )
    j = jac(7, 4, 9)
    g = j @ j.T
    torch.testing.assert_close(
        A.fairgrad_weights(g, alpha=1.0), A.nash_mtl_solve(g), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(A.fairgrad_weights(g, alpha=0.0), torch.full((4,), 0.25, dtype=F64))


def test_active_mask_and_zero_gradient_tasks():
    j = jac(3, 4, 8)
    g = j @ j.T
    active = torch.tensor([True, False, True, True])
    sub = A.fairgrad_weights(g[active][:, active], alpha=2.0)
    w = A.fairgrad_weights(g, alpha=2.0, active=active)
    torch.testing.assert_close(w[active], sub)
    assert float(w[1]) == 0.0
    j[2] = 0.0
    w0 = A.fairgrad_weights(j @ j.T, alpha=2.0)
    assert float(w0[2]) == 0.0
    keep = torch.tensor([True, True, False, True])
    torch.testing.assert_close(w0[keep], A.fairgrad_weights((j @ j.T)[keep][:, keep], alpha=2.0))
    with pytest.raises(ValueError, match="alpha"):
        A.aggregator("fairgrad", alpha=-1.0).update(A.aggregator("fairgrad").init(4), {"w": j})
