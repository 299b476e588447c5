"""UPGrad (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization", Eq. 5).

Each row ``u_i g_i`` (``u`` the preference, uniform by default) is projected onto the dual cone
of the rows of ``J``; the result is the sum of the projections. In weights: ``v⁽ⁱ⁾ =
argmin_{v ≥ u_i e_i} vᵀ G v`` (Prop. 1) and ``w = Σ_i v⁽ⁱ⁾``, solved on TorchJD's regularised,
trace-normalised Gramian ``G / tr(G) + reg_eps·I`` by the fixed-iteration active-set QP of
:mod:`._qp`. Non-conflicting: ``⟨Σ w_k g_k, g_j⟩ = (G w)_j ≥ 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradfn._internal.checks import check_int, check_nonnegative
from gradfn.aggregators._base import (
    check_active,
    check_gram,
    check_pref,
    eye_like,
    finish,
    from_weighting,
    normalize_trace,
    pref_or_mean,
    restrict_or_all,
)
from gradfn.aggregators._qp import dual_cone_project

__all__ = ["upgrad", "upgrad_weights"]


def _check_eps(norm_eps: float, reg_eps: float, iters: int) -> tuple[float, float, int]:
    """``(norm_eps, reg_eps, iters)`` checked: finite numbers ``≥ 0`` and an integer ``≥ 1``."""
    return (
        check_nonnegative("norm_eps", norm_eps),
        check_nonnegative("reg_eps", reg_eps),
        check_int("iters", iters, 1),
    )


def regularized(
    gram: Tensor, active: Tensor | None, norm_eps: float, reg_eps: float
) -> tuple[Tensor, Tensor | None]:
    g, a = restrict_or_all(gram, active)
    return normalize_trace(g, norm_eps) + reg_eps * eye_like(g), a


def upgrad_weights(
    gram: Tensor,
    *,
    pref: Tensor | None = None,
    norm_eps: float = 0.0,
    reg_eps: float = 1e-4,
    iters: int = 20,
    active: Tensor | None = None,
) -> Tensor:
    """UPGrad weights from the Gramian.

    Args:
        gram: ``G`` (``K×K``).
        pref: preference ``u`` (``K,``); default uniform ``1/K`` over the active tasks.
        norm_eps: a trace ``tr(G) ≤ norm_eps`` counts as a zero Gramian. TorchJD uses ``1e-4``
            (an absolute threshold, so tiny gradients fall back to the mean); the default 0 keeps
            the method scale-invariant.
        reg_eps: ``reg_eps·I`` is added to the normalised Gramian (TorchJD's default).
        iters: active-set iterations.
        active: optional ``(K,)`` bool mask.
    """
    k = check_gram(gram, "upgrad_weights")
    check_active(active, k, "upgrad_weights")
    check_pref(pref, k, "upgrad_weights")
    norm_eps, reg_eps, iters = _check_eps(norm_eps, reg_eps, iters)
    g, a = regularized(gram, active, norm_eps, reg_eps)
    u = pref_or_mean(pref, a, g)
    v = dual_cone_project(torch.diag(u), g, iters)
    return finish(v.sum(0), gram, a)


upgrad = from_weighting(upgrad_weights, "upgrad")
upgrad.__doc__ = """UPGrad on task-stacked ``grads``: ``Aggregated(Σ_k w_k g_k, w)``, keywords as
:func:`upgrad_weights` plus an optional precomputed ``gram``."""
