"""Eager-CPU paths of MGDA, IMTL-G and GradVac — two-task closed forms in Python floats, IMTL-G's
Cholesky solve — against the general tensor path (forced by patching the eager-CPU gates away)
and independent oracles: TorchJD, hand-derived values and naive loops on the gradient vectors."""

from __future__ import annotations

import math

import pytest
import torch
import torchjd.aggregation as tjd

import gradfn.aggregators as A
from gradfn.aggregators import _gradvac, _imtl_g, _mgda
from tests.unit.aggregators._common import F64, close, jac

MODULES = {"mgda": _mgda, "imtl_g": _imtl_g, "gradvac": _gradvac}


def two_task_jacobians(dtype=F64) -> list[torch.Tensor]:
    """Random, conflicting and every degenerate two-row shape (parallel, antiparallel, equal and
    opposite, a zero row, all zero, one row dominating)."""
    out = []
    for seed in range(4):
        out.append(jac(seed, 2, 7, dtype))
    base = jac(10, 2, 7, dtype)
    for second in (2.0 * base[0], -2.0 * base[0], -base[0], 0.0 * base[0], 30.0 * base[0]):
        out.append(torch.stack([base[0], second]))
    out.append(torch.zeros(2, 7, dtype=dtype))
    out.append(torch.stack([base[0], base[0] + 1e-3 * base[1]]))  # nearly parallel, full rank
    return out


def tensor_path(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """Take the tensor path (what runs compiled or on an accelerator) on eager CPU tensors."""
    monkeypatch.setattr(MODULES[method], "host_values", lambda x: None)
    if hasattr(MODULES[method], "eager_cpu"):
        monkeypatch.setattr(MODULES[method], "eager_cpu", lambda x: False)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("method", ["mgda", "imtl_g"])
def test_closed_form_matches_the_tensor_path(monkeypatch, method, dtype):
    fn = {"mgda": A.mgda_weights, "imtl_g": A.imtl_g_weights}[method]
    grams = [j @ j.T for j in two_task_jacobians(dtype)]
    host = [fn(g) for g in grams]
    tensor_path(monkeypatch, method)
    for g, w in zip(grams, host, strict=True):
        ref = fn(g)
        assert w.dtype == ref.dtype == dtype
        # 1e-9: the pinv path loses ~eps·cond(Ĝ) on the nearly parallel pair; the closed form
        # does not (checked against the norms in the next test)
        close(w.double(), ref.double(), 1e-9 if dtype == F64 else 1e-6)


def test_imtl_g_two_tasks_matches_torchjd_and_liu_et_al():
    for j in two_task_jacobians():
        g = j @ j.T
        w = A.imtl_g_weights(g)
        close(w, tjd.IMTLG().gramian_weighting(g), 1e-7)
    nearly_parallel = two_task_jacobians()[-1]
    for j in [jac(seed, 2, 5) for seed in range(6)] + [nearly_parallel]:
        # full rank: w = (‖g₂‖, ‖g₁‖)/(‖g₁‖ + ‖g₂‖), equal projections onto both unit gradients
        w = A.imtl_g_weights(j @ j.T)
        n = j.norm(dim=1)
        close(w, torch.stack([n[1], n[0]]) / n.sum())
        d = w @ j
        u = j / n[:, None]
        assert float(u[0] @ d) == pytest.approx(float(u[1] @ d), rel=1e-12)


def test_mgda_two_tasks_tensor_closed_form_matches_the_host_one(monkeypatch):
    # both against the QP and a grid in test_against_oracles; here: the two agree
    grams = [j @ j.T for j in two_task_jacobians()]
    host = [A.mgda_weights(g) for g in grams]
    tensor_path(monkeypatch, "mgda")
    for g, w in zip(grams, host, strict=True):
        close(w, A.mgda_weights(g), 1e-12)
        close(w, A.mgda_weights(g, active=torch.ones(2, dtype=torch.bool)), 1e-7)


def naive_gradvac(j: torch.Tensor, phi: list[list[float]], beta: float, eps: float):
    """Wang et al. 2021 on the two gradient vectors: for each task i and its other task j, if
    cos(g_i, g_j) < φ̂_ij, g_i += w g_j (the paper's closed-form w); φ̂_ij ← EMA."""
    rows, new = [], [r[:] for r in phi]
    for i in range(2):
        gi, gj = j[i].clone(), j[1 - i]
        cos = float(gi @ gj) / (float(gi.norm()) * float(gj.norm()) + eps)
        hat = phi[i][1 - i]
        if cos < hat:
            w = (
                float(gi.norm())
                * (hat * math.sqrt(1 - cos**2) - cos * math.sqrt(1 - hat**2))
                / (float(gj.norm()) * math.sqrt(1 - hat**2) + eps)
            )
            gi = gi + w * gj
        new[i][1 - i] = (1 - beta) * hat + beta * cos
        rows.append(gi)
    return rows[0] + rows[1], new


def test_gradvac_two_tasks_matches_torchjd_a_naive_loop_and_the_tensor_path(monkeypatch):
    beta, eps = 0.3, 1e-8
    js = [jac(s, 2, 9) for s in range(4)] + two_task_jacobians()
    ref_agg = tjd.GradVac(beta=beta, eps=eps)
    state = A.gradvac_init(2)
    naive_phi = [[0.0, 0.0], [0.0, 0.0]]
    host = []
    for j in js:
        g = j @ j.T
        state, w = A.gradvac_weights(state, g, beta=beta, eps=eps)
        host.append((state, w))
        atol = 1e-9 * float(j.abs().max())  # relative to the rows: their sum may cancel
        torch.testing.assert_close(w @ j, ref_agg(j), rtol=0, atol=atol)
        expected, naive_phi = naive_gradvac(j, naive_phi, beta, eps)
        torch.testing.assert_close(w @ j, expected, rtol=0, atol=atol)
        close(state.phi, torch.tensor(naive_phi, dtype=F64), 1e-12)
    assert int(state.count) == len(js)
    tensor_path(monkeypatch, "gradvac")
    state = A.gradvac_init(2)
    for j, (ref_state, ref_w) in zip(js, host, strict=True):
        state, w = A.gradvac_weights(state, j @ j.T, beta=beta, eps=eps)
        # not bitwise: an ulp of cos ≈ ±1 (the parallel pairs) moves √(1 − cos²) by ~1e-8
        close(w, ref_w, 1e-9)
        close(state.phi, ref_state.phi, 1e-12)


def test_gradvac_two_tasks_correction_reaches_the_target():
    # after a correction, cos(g_i + w g_j, g_j) is the target φ̂_ij (the vaccine's defining goal)
    j = jac(3, 2, 11)
    hat = 0.4
    state = A.GradVacState(
        torch.tensor([[0.0, hat], [hat, 0.0]], dtype=F64), *A.gradvac_init(2)[1:]
    )
    _, w = A.gradvac_weights(state, j @ j.T, eps=0.0 + 1e-300)
    c = w - 1.0  # c[j]: the correction added to row i = 1 − j
    for i in range(2):
        gi = j[i] + c[1 - i] * j[1 - i]
        cos = float(gi @ j[1 - i]) / float(gi.norm() * j[1 - i].norm())
        assert cos == pytest.approx(hat, abs=1e-12)


@pytest.mark.parametrize("method", ["mgda", "imtl_g", "gradvac"])
def test_two_tasks_non_finite(monkeypatch, method):
    g = torch.tensor([[1.0, 0.5], [0.5, float("nan")]], dtype=torch.float32)
    agg = A.aggregator(method)

    def run():
        state = agg.init(2)
        new, w = agg.weighting(state, g)
        return state, new, w

    results = [run()]
    tensor_path(monkeypatch, method)
    results.append(run())
    for state, new, w in results:
        assert w.dtype == torch.float32 and bool(w.isnan().all())
        if method == "gradvac":  # targets kept, counter advanced
            torch.testing.assert_close(new.phi, state.phi)
            assert int(new.count) == 1


@pytest.mark.parametrize("method", ["mgda", "imtl_g", "gradvac"])
def test_two_tasks_tensor_path_when_the_gramian_needs_gradients(method):
    g = jac(0, 2, 5)
    g = g @ g.T
    agg = A.aggregator(method)
    _, w = agg.weighting(agg.init(2), g)
    _, w_grad = agg.weighting(agg.init(2), g.clone().requires_grad_())
    close(w_grad.detach(), w, 1e-7)


def imtl_g_cases() -> list[tuple[torch.Tensor, torch.Tensor | None, float]]:
    """(Gramian, mask, tolerance against TorchJD): full rank, rank-deficient, ill-conditioned,
    zero, masked; K ∈ {3, 8, 32}."""
    out: list[tuple[torch.Tensor, torch.Tensor | None, float]] = []
    for k in (3, 8, 32):
        for n in (2 * k, k // 2 + 1):  # full rank, rank-deficient
            j = jac(k + n, k, n)
            out.append((j @ j.T, None, 1e-7))
        # cond ~ 1e10: past the Cholesky cap (any two pinv agree to ~cond·eps); ~1e4: Cholesky
        for tilt, tol in ((1e-5, 1e-4), (1e-2, 1e-7)):
            j = jac(k, k, 3 * k)
            j[2] = j[0] + tilt * j[2]
            out.append((j @ j.T, None, tol))
        out.append((torch.zeros(k, k, dtype=F64), None, 1e-7))
        mask = torch.ones(k, dtype=torch.bool)
        mask[1] = False
        out.append((j @ j.T, mask, 1e-7))
    return out


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_imtl_g_eager_cpu_path_matches_the_tensor_path_and_torchjd(monkeypatch, dtype):
    cases = [(g.to(dtype), m, tol) for g, m, tol in imtl_g_cases()]
    eager = [A.imtl_g_weights(g, active=m) for g, m, _ in cases]
    tensor_path(monkeypatch, "imtl_g")
    for (g, m, tol), w in zip(cases, eager, strict=True):
        ref = A.imtl_g_weights(g, active=m)
        assert w.dtype == ref.dtype == dtype
        close(w.double(), ref.double(), 1e-7 if dtype == F64 else 1e-5)
        if m is None and dtype == F64:
            close(w, tjd.IMTLG().gramian_weighting(g), tol)


def test_imtl_g_eager_cpu_non_finite():
    g = jac(0, 4, 9)
    g = g @ g.T
    g[1, 2] = float("inf")
    assert bool(A.imtl_g_weights(g).isnan().all())
    g[1, 2] = float("nan")
    assert bool(A.imtl_g_weights(g.float()).isnan().all())
