"""Aggregator values against TorchJD and scipy oracles (float64, tolerance 1e-9 relative unless
stated)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchjd.aggregation as tjd
from scipy.optimize import minimize
from torchjd._linalg import DualConeProjector, normalize, regularize

import gradfn.aggregators as A
from tests.unit.aggregators._common import CASES, F64, close, flat, jac, split


class ScipyProjector(DualConeProjector):
    """TorchJD's dual-cone projection with scipy's L-BFGS-B in place of quadprog."""

    def __init__(self, norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> None:
        self.norm_eps, self.reg_eps = norm_eps, reg_eps

    def __call__(self, u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        gm = regularize(normalize(g, self.norm_eps), self.reg_eps).double().numpy()
        out = []
        for row in u.reshape(-1, gm.shape[0]).double().numpy():
            res = minimize(
                lambda v: v @ gm @ v,
                row.copy(),
                jac=lambda v: 2 * gm @ v,
                bounds=[(x, None) for x in row],
                method="L-BFGS-B",
                options={"ftol": 1e-16, "gtol": 1e-13, "maxiter": 10000},
            )
            out.append(res.x)
        return torch.tensor(np.array(out), dtype=g.dtype).reshape(u.shape)


def cagrad_oracle(g: torch.Tensor, c: float) -> np.ndarray:
    """CAGrad's dual on the trace-normalised Gramian with scipy SLSQP (as the reference code)."""
    gn = (g / g.trace()).numpy()
    k = gn.shape[0]
    b = np.ones(k) / k
    sphi = c * math.sqrt(b @ gn @ b)

    def f(w):
        return w @ gn @ b + sphi * math.sqrt(max(w @ gn @ w, 0.0))

    res = minimize(
        f,
        b,
        bounds=[(0, 1)] * k,
        method="SLSQP",
        constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    w = res.x
    return b + sphi / math.sqrt(w @ gn @ w) * w


def nash_oracle(g: torch.Tensor) -> np.ndarray:
    """The bargaining solution ``α ⊙ Gα = 1`` as the minimiser of ``½αᵀGα − Σ log α``."""
    gm = g.numpy()
    k = gm.shape[0]
    res = minimize(
        lambda a: 0.5 * a @ gm @ a - np.log(a).sum(),
        np.ones(k),
        jac=lambda a: gm @ a - 1 / a,
        bounds=[(1e-12, None)] * k,
        method="L-BFGS-B",
        options={"ftol": 1e-16, "gtol": 1e-13, "maxiter": 20000},
    )
    return res.x


@pytest.mark.parametrize("case", CASES)
def test_values_match_torchjd_closed_form(case):
    seed, k, n = case
    j = jac(seed, k, n)
    grads = split(j)
    close(flat(A.mean(grads).grad), tjd.Mean()(j))
    close(flat(A.sum_(grads).grad), tjd.Sum()(j))
    close(flat(A.imtl_g(grads).grad), tjd.IMTLG()(j), 1e-7)
    for mode in ("min", "median", "rmse"):
        close(
            flat(A.aligned_mtl(grads, scale_mode=mode).grad),
            tjd.AlignedMTL(scale_mode=mode)(j),
            1e-7,
        )
    close(flat(A.config(grads).grad), tjd.ConFIG()(j), 1e-7)
    close(flat(A.mgda(grads, solver="frank_wolfe").grad), tjd.MGDA()(j))


@pytest.mark.parametrize("case", CASES)
def test_values_match_torchjd_random_methods(case):
    seed, k, n = case
    j = jac(seed, k, n)
    grads = split(j)
    torch.manual_seed(seed)
    order = torch.stack([torch.randperm(k) for _ in range(k)])
    torch.manual_seed(seed)
    close(flat(A.pcgrad(grads, order=order).grad), tjd.PCGrad()(j))
    torch.manual_seed(seed)
    noise = torch.rand(n, dtype=F64)
    torch.manual_seed(seed)
    ref = tjd.GradDrop()(j)
    out = A.graddrop(grads, noise={"a": noise[: n // 2], "b": noise[n // 2 :]})
    close(flat(out.grad), ref)
    close(flat({x: r.sum(0) for x, r in out.rows.items()}), ref)


@pytest.mark.parametrize("case", CASES)
def test_gradvac_matches_torchjd_over_steps(case):
    seed, k, n = case
    ref_agg = tjd.GradVac(beta=0.3)
    state = A.gradvac_init(k)
    for step in range(3):
        j = jac(seed * 10 + step, k, n)
        torch.manual_seed(step)
        orders = []
        for i in range(k):
            others = [x for x in range(k) if x != i]
            orders.append([others[p] for p in torch.randperm(k - 1).tolist()])
        torch.manual_seed(step)
        ref = ref_agg(j)
        order = torch.tensor(orders, dtype=torch.int64).reshape(k, k - 1)
        state, w = A.gradvac_weights(state, j @ j.T, beta=0.3, order=order)
        close(w @ j, ref)


@pytest.mark.parametrize("case", CASES)
def test_qp_methods_match_torchjd_with_exact_projector(case):
    seed, k, n = case
    j = jac(seed, k, n)
    grads = split(j)
    up = A.upgrad(grads, norm_eps=1e-4).grad
    dp = A.dualproj(grads, norm_eps=1e-4).grad
    close(flat(up), tjd.UPGrad(projector=ScipyProjector())(j), 1e-6)
    close(flat(dp), tjd.DualProj(projector=ScipyProjector())(j), 1e-6)


@pytest.mark.parametrize("case", CASES)
def test_mgda_exact_is_at_least_as_good_as_torchjd(case):
    seed, k, n = case
    j = jac(seed, k, n)
    g = j @ j.T
    w = A.mgda_weights(g)
    ref = tjd.MGDAWeighting(epsilon=1e-9, max_iters=3000)(g)
    assert float(w.sum()) == pytest.approx(1.0) and bool((w >= 0).all())
    assert float(w @ g @ w) <= float(ref @ g @ ref) + 1e-9 * float(g.trace())


@pytest.mark.parametrize("case", CASES)
def test_cagrad_matches_scipy(case):
    seed, k, n = case
    j = jac(seed, k, n)
    g = j @ j.T
    for c in (0.25, 0.5, 0.9):
        np.testing.assert_allclose(A.cagrad_weights(g, c=c).numpy(), cagrad_oracle(g, c), atol=1e-5)


@pytest.mark.parametrize("case", [c for c in CASES if c[2] >= c[1]])
def test_nash_mtl_matches_scipy(case):
    seed, k, n = case
    j = jac(seed, k, n)
    g = j @ j.T
    alpha = A.nash_mtl_solve(g)
    np.testing.assert_allclose(alpha.numpy(), nash_oracle(g), rtol=1e-5)
    torch.testing.assert_close(alpha * (g @ alpha), torch.ones(k, dtype=F64))


def test_nash_mtl_state_reuse_and_clipping():
    agg = A.aggregator("nash_mtl", max_norm=0.5, update_weights_every=2)
    j1, j2 = jac(0, 3, 8), jac(1, 3, 8)
    state = agg.init(3)
    state, out1 = agg.update(state, {"w": j1})
    alpha1 = A.nash_mtl_solve(j1 @ j1.T)
    torch.testing.assert_close(state.alpha, alpha1)
    state, out2 = agg.update(state, {"w": j2})  # reuses alpha1, clipped on j2
    d = alpha1 @ j2
    expected = d * min(1.0, 0.5 / float(d.norm()))
    torch.testing.assert_close(out2.grad["w"], expected)
    assert int(state.step) == 2
    assert float(out1.grad["w"].norm()) <= 0.5 + 1e-12


@pytest.mark.parametrize("seed", range(6))
def test_mgda_two_tasks_closed_form_matches_a_grid_and_the_qp(seed):
    # K = 2 takes Sener & Koltun's closed form; the masked path (all active) runs the QP
    j = jac(seed, 2, 5)
    if seed % 3 == 0:
        j[1] = 2.0 * j[0]  # one gradient dominates: a vertex of the simplex
    g = j @ j.T
    w = A.mgda_weights(g)
    w_qp = A.mgda_weights(g, active=torch.ones(2, dtype=torch.bool))
    close(w, w_qp, 1e-7)
    t = torch.linspace(0, 1, 100_001, dtype=F64)
    grid = torch.stack([t, 1 - t], 1)
    best = ((grid @ g) * grid).sum(1).min()
    assert float(w @ g @ w) <= float(best) + 1e-9 * float(g.trace())
