"""DualProj (Lopez-Paz & Ranzato 2017, GEM, Eq. 11; as in TorchJD): the preference-weighted
combination ``Jᵀu`` projected onto the dual cone of the rows: ``w = argmin_{v ≥ u} vᵀ G v``
on ``G / tr(G) + reg_eps·I``. Non-conflicting: ``(G w)_j ≥ 0``.
"""

from __future__ import annotations

from torch import Tensor

from gradfn.aggregators._base import (
    check_active,
    check_gram,
    check_pref,
    finish,
    from_weighting,
    pref_or_mean,
)
from gradfn.aggregators._qp import dual_cone_project
from gradfn.aggregators._upgrad import _check_eps, regularized

__all__ = ["dualproj", "dualproj_weights"]


def dualproj_weights(
    gram: Tensor,
    *,
    pref: Tensor | None = None,
    norm_eps: float = 0.0,
    reg_eps: float = 1e-4,
    iters: int = 20,
    active: Tensor | None = None,
) -> Tensor:
    """DualProj weights; arguments as :func:`gradfn.aggregators.upgrad_weights`."""
    k = check_gram(gram, "dualproj_weights")
    check_active(active, k, "dualproj_weights")
    check_pref(pref, k, "dualproj_weights")
    norm_eps, reg_eps, iters = _check_eps(norm_eps, reg_eps, iters)
    g, a = regularized(gram, active, norm_eps, reg_eps)
    u = pref_or_mean(pref, a, g)
    v = dual_cone_project(u[None, :], g, iters)[0]
    return finish(v, gram, a)


dualproj = from_weighting(dualproj_weights, "dualproj")
dualproj.__doc__ = """DualProj on task-stacked ``grads``: ``Aggregated(Σ_k w_k g_k, w)``, keywords
as :func:`dualproj_weights` plus an optional precomputed ``gram``."""
