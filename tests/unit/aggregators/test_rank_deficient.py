"""Every aggregator on rank-deficient float32 task gradients — more tasks than parameters, exact
duplicates, a row that is a combination of others, a zero row, near-duplicates, an antiparallel
pair — gives a finite output that agrees with TorchJD where TorchJD has the method.

Tolerances are relative to the largest entry of TorchJD's output, and compare the aggregated
vector (under rank deficiency the weights are not unique). TorchJD runs on the same float32
input, so its own rounding sets the floor; ConFIG on near-duplicates inverts singular values
~1e-4 of the largest and loses ~1e-3 to float32 there (TorchJD in float64 agrees with it to 1e-3).
"""

from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as tjd
from hypothesis import given, settings
from hypothesis import strategies as st

import gradfn.aggregators as A

CASES = ("k_gt_n", "duplicate", "combination", "zero_row", "near_duplicate", "antiparallel")
# relative tolerance against TorchJD (None: TorchJD lacks the method; float64 self-check instead)
TOL = {
    "mean": 1e-6,
    "sum": 1e-6,
    "mgda": 1e-4,  # Frank-Wolfe, TorchJD's solver
    "upgrad": 1e-3,  # both solve a QP on the regularised Gramian
    "dualproj": 1e-3,
    "cagrad": 1e-3,
    "fairgrad": 5e-3,  # damped Newton vs TorchJD's scipy least squares on a singular Gramian
    "imtl_g": 1e-5,
    "aligned_mtl": 1e-5,
    "config": 1e-5,
    "pcgrad": 1e-5,
    "graddrop": 1e-5,
    "gradvac": 1e-5,
    "gcond": None,
    "nash_mtl": None,
    "inverse_norm": None,
}


def jacobian(case: str, seed: int) -> torch.Tensor:
    """A float32 ``K×n`` matrix of task gradients with the named rank deficiency."""
    g = torch.Generator().manual_seed(seed)
    if case == "k_gt_n":
        return torch.randn(8, 4, generator=g)
    j = torch.randn(5, 10, generator=g)
    if case == "duplicate":
        j[1] = j[0]
        j[4] = j[2]
    elif case == "combination":
        j[3] = j[0] + 2.0 * j[1]
        j[4] = 0.5 * j[1] - j[2]
    elif case == "zero_row":
        j[2] = 0.0
    elif case == "near_duplicate":
        j[1] = j[0] + 1e-4 * torch.randn(10, generator=g)
    elif case == "antiparallel":
        j[4] = -j[0]
    return j


def orders(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PCGrad's ``(K, K)`` and GradVac's ``(K, K−1)`` visiting orders as TorchJD draws them
    after ``torch.manual_seed(0)``."""
    torch.manual_seed(0)
    pc = torch.stack([torch.randperm(k) for _ in range(k)])
    torch.manual_seed(0)
    rows = []
    for i in range(k):
        others = [x for x in range(k) if x != i]
        rows.append([others[p] for p in torch.randperm(k - 1).tolist()])
    return pc, torch.tensor(rows, dtype=torch.int64).reshape(k, k - 1)


def ours(method: str, j: torch.Tensor) -> torch.Tensor:
    k, n = j.shape
    grads = {"w": j}
    if method == "pcgrad":
        return A.pcgrad(grads, order=orders(k)[0]).grad["w"]
    if method == "graddrop":
        torch.manual_seed(0)
        return A.graddrop(grads, noise={"w": torch.rand(n, dtype=j.dtype)}).grad["w"]
    if method == "gradvac":
        _, w = A.gradvac_weights(A.gradvac_init(k), j @ j.T, beta=0.3, order=orders(k)[1])
        return w.to(j.dtype) @ j
    if method == "mgda":
        return A.mgda(grads, solver="frank_wolfe").grad["w"]
    agg = A.aggregator(method)
    return agg.update(agg.init(k), grads)[1].grad["w"]


def torchjd_of(method: str, j: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)
    make = {
        "mean": tjd.Mean,
        "sum": tjd.Sum,
        "mgda": tjd.MGDA,
        "upgrad": tjd.UPGrad,
        "dualproj": tjd.DualProj,
        "cagrad": lambda: tjd.CAGrad(c=0.5),
        "fairgrad": lambda: tjd.FairGrad(alpha=1.0),
        "imtl_g": tjd.IMTLG,
        "aligned_mtl": tjd.AlignedMTL,
        "config": tjd.ConFIG,
        "pcgrad": tjd.PCGrad,
        "graddrop": tjd.GradDrop,
        "gradvac": lambda: tjd.GradVac(beta=0.3),
    }[method]
    return make()(j)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).abs().max()) / max(float(ref.abs().max()), 1e-6)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", A.METHODS)
@settings(max_examples=3, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16))
def test_rank_deficient_float32_is_finite_and_matches_torchjd(method, case, seed):
    j = jacobian(case, seed)
    out = ours(method, j.clone())
    assert out.dtype == torch.float32
    assert bool(torch.isfinite(out).all()), (method, case, out)
    tol = TOL[method]
    if method == "cagrad" and case in ("k_gt_n", "antiparallel"):
        # the origin is (nearly) in the convex hull: CAGrad's output jumps between 0 (its
        # stationarity cut) and the ball ‖d − ḡ‖ = c‖ḡ‖, and the fixed-iteration solver need not
        # reach TorchJD's optimum there (docs/reliability.md): check the ball only
        g0 = j.double().mean(0)
        gap = float((out.double() - g0).norm()) - 0.5 * float(g0.norm())
        assert float(out.abs().max()) == 0.0 or abs(gap) <= 1e-4 * float(g0.norm())
        return
    if method == "fairgrad" and case == "k_gt_n":
        # K > n: (G w)_k = w_k^(−1/α) has no exact solution on a rank-n Gramian; the two solvers
        # stop at different approximate points (seen: 14 % apart), both finite
        return
    if tol is None:  # no TorchJD method: the float32 run against the same input in float64
        # (GCond's thresholded resolution and Nash-MTL's Newton steps on a bargaining problem
        # with no finite solution when K > n amplify float32 rounding to a few 1e-3)
        ref = ours(method, j.double())
        assert rel_err(out, ref) <= 2e-2, (out, ref)
        return
    if method == "config" and case == "near_duplicate":
        tol = 1e-2
    ref = torchjd_of(method, j.clone())
    assert rel_err(out, ref) <= tol, (out, ref)


def min_norm_point(j: torch.Tensor) -> torch.Tensor:
    """The exact minimum-norm point of the rows' convex hull (SciPy SLSQP in float64)."""
    import numpy as np
    import scipy.optimize as so

    g = (j.double() @ j.double().T).numpy()
    k = g.shape[0]
    res = so.minimize(
        lambda w: w @ g @ w,
        np.ones(k) / k,
        jac=lambda w: 2 * g @ w,
        bounds=[(0, None)] * k,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return torch.from_numpy(res.x) @ j.double()


@pytest.mark.parametrize("case", CASES)
def test_mgda_active_set_reaches_the_min_norm_point_on_float32_rank_deficiency(case):
    """A float32 Gramian of rank-deficient rows has eigenvalues ~±1e-8 of its trace where they
    are 0 in exact arithmetic; the active-set QP must not stall on them (it stopped ~1 % of the
    largest row away from the origin on K = 8 > n = 4, up to 7 % on the seeds below)."""
    for seed in range(25):
        j = jacobian(case, seed)
        out = A.mgda({"w": j}).grad["w"]
        err = float((out.double() - min_norm_point(j)).norm())
        assert err <= 1e-4 * float(j.norm(dim=1).max()), (seed, err)
