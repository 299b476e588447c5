"""CAGrad (Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning",
Algorithm 1 / Eq. 4 dual), as in TorchJD, on ``Ĝ = G / tr(G)``:

``w* = argmin_{w ∈ Δ} wᵀ Ĝ b + √φ ‖Ĝ^{1/2} w‖`` with ``b = 1/K``, ``√φ = c ‖Ĝ^{1/2} b‖``; the update
weights are ``b + (√φ / ‖g_w‖) w*`` (0 when ``‖g_w‖ < stationary_eps``: near the Pareto front).

Solver (tensor-only, fixed iterations): each step solves two simplex QPs with the active-set QP
of :mod:`._qp` — a majorise-minimise step (``√x ≤ x/(2t) + t/2`` at ``t = ‖g_w‖``: monotone,
globally convergent) and a Newton (SQP) step on the exact Hessian (fast near the optimum) — and
keeps the point with the lower objective. TorchJD solves the same convex problem with
cvxpy/Clarabel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradfn._internal.checks import check_int, check_nonnegative
from gradfn._internal.compat import is_compiling
from gradfn.aggregators._base import (
    check_active,
    check_gram,
    eye_like,
    finish,
    from_weighting,
    normalize_trace,
    restrict,
)
from gradfn.aggregators._qp import simplex_qp

__all__ = ["cagrad", "cagrad_weights"]


def cagrad_weights(
    gram: Tensor,
    *,
    c: float = 0.5,
    norm_eps: float = 0.0,
    stationary_eps: float = 1e-4,
    iters: int = 10,
    qp_iters: int = 12,
    reg_eps: float = 1e-10,
    active: Tensor | None = None,
) -> Tensor:
    """CAGrad weights from the Gramian.

    Args:
        gram: ``G`` (``K×K``).
        c: radius scale of the ball around the mean gradient (``c ≥ 0``).
        norm_eps: a trace ``≤ norm_eps`` counts as a zero Gramian (TorchJD: its ``norm_eps``,
            ``1e-4``); default 0 keeps the method scale-invariant.
        stationary_eps: ``‖g_w‖`` (normalised scale) below it gives zero weights (TorchJD's
            ``norm_eps`` second use).
        iters, qp_iters: outer majorise-minimise steps and inner active-set steps.
        active: optional ``(K,)`` bool mask.
    """
    k = check_gram(gram, "cagrad_weights")
    check_active(active, k, "cagrad_weights")
    c, norm_eps = check_nonnegative("c", c), check_nonnegative("norm_eps", norm_eps)
    stationary_eps = check_nonnegative("stationary_eps", stationary_eps)
    reg_eps = check_nonnegative("reg_eps", reg_eps)
    iters, qp_iters = check_int("iters", iters, 1), check_int("qp_iters", qp_iters, 1)
    g, a = restrict(gram, active)
    g = normalize_trace(g, norm_eps)
    on = torch.where(a.sum() > 0, a, torch.ones_like(a))
    b = on / on.sum()
    lin = g @ b
    sqrt_phi = c * (b @ lin).clamp_min(0.0).sqrt()
    reg = reg_eps * eye_like(g)

    def objective(w: Tensor) -> Tensor:
        return w @ lin + sqrt_phi * (w @ g @ w).clamp_min(0.0).sqrt()

    w = b
    early_exit = g.device.type == "cpu" and not is_compiling()
    for _ in range(iters):
        gw = g @ w
        t = (w @ gw).clamp_min(0.0).sqrt().clamp_min(1e-12)
        # majorise-minimise step (monotone) and a Newton (SQP) step; keep the better point
        w_mm = simplex_qp((sqrt_phi / t) * g + reg, lin, on, qp_iters)
        hess = (sqrt_phi / t) * (g - torch.outer(gw, gw) / (t * t)) + reg
        grad = lin + (sqrt_phi / t) * gw
        w_nt = simplex_qp(hess, grad - hess @ w, on, qp_iters)
        w_best = torch.where(objective(w_nt) < objective(w_mm), w_nt, w_mm)
        w_next = torch.where(objective(w_best) <= objective(w), w_best, w)
        # eagerly on the CPU a read-back is free: stop once the iterate no longer moves
        done = early_exit and bool((w_next - w).abs().max() <= 1e-12)
        w = w_next
        if done:
            break
    gw_norm = (w @ g @ w).clamp_min(0.0).sqrt()
    weights = b + (sqrt_phi / gw_norm.clamp_min(1e-30)) * w
    weights = torch.where(gw_norm >= stationary_eps, weights, torch.zeros_like(weights))
    return finish(weights, gram, a)


cagrad = from_weighting(cagrad_weights, "cagrad")
cagrad.__doc__ = """CAGrad on task-stacked ``grads``: ``Aggregated(Σ_k w_k g_k, w)``, keywords as
:func:`cagrad_weights` plus an optional precomputed ``gram``."""
