"""MGDA (Désidéri 2012; Sener & Koltun 2018): the minimum-norm point of the convex hull of the
task gradients, ``w = argmin_{w ∈ Δ} wᵀ G w``.

Two tensor solvers: ``"active_set"`` (default; exact, the primal-dual active-set QP of
:mod:`._qp`) and ``"frank_wolfe"`` (Algorithm 2 of Sener & Koltun, with TorchJD's ``epsilon``
and ``max_iters`` stopping rule, written as a fixed loop whose later iterations are masked out,
so it reproduces TorchJD's numbers). Two tasks without a mask: Sener & Koltun's closed form
(Algorithm 1), in Python floats eagerly on the CPU (no tensor op), in tensors otherwise.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from gradfn._internal.checks import check_int, check_nonnegative, check_positive
from gradfn.aggregators._base import (
    check_active,
    check_gram,
    eye_like,
    finish,
    from_weighting,
    host_values,
    normalize_trace,
    restrict,
)
from gradfn.aggregators._qp import simplex_qp

__all__ = ["mgda", "mgda_weights"]


def _frank_wolfe(g: Tensor, a: Tensor, epsilon: float, max_iters: int) -> Tensor:
    k = g.shape[0]
    alpha = a / a.sum()
    done = torch.zeros((), dtype=torch.bool, device=g.device)
    inf = torch.full((k,), float("inf"), dtype=g.dtype, device=g.device)
    for _ in range(max_iters):
        ga = g @ alpha
        t = torch.argmin(torch.where(a > 0, ga, inf))
        e = torch.nn.functional.one_hot(t, k).to(g.dtype)
        aa = ga[t]
        b = alpha @ ga
        c = g[t, t]
        denom = b + c - 2 * aa
        gamma = torch.where(
            c <= aa,
            1.0,
            torch.where(b <= aa, 0.0, (b - aa) / torch.where(denom > 0, denom, 1.0)),
        )
        alpha = torch.where(done, alpha, (1 - gamma) * alpha + gamma * e)
        done = done | (gamma < epsilon)
    return alpha


def _two_tasks(q: Tensor) -> Tensor:
    """The exact minimiser of ``wᵀ Q w`` on the 2-simplex (Sener & Koltun 2018, Algorithm 1):
    ``w₁ = clip((Q₂₂ − Q₁₂) / (Q₁₁ + Q₂₂ − 2 Q₁₂), 0, 1)`` (½ when the denominator is 0)."""
    d = torch.diagonal(q)
    q12 = q[0, 1]
    den = d.sum() - 2.0 * q12
    t = torch.where(den > 0, (d[1] - q12) / den, 0.5).clamp(0.0, 1.0)
    return torch.stack([t, 1.0 - t])


def _two_tasks_host(gram: list[list[float]], reg_eps: float) -> list[float]:
    """:func:`_two_tasks` on ``G/tr(G) + reg_eps·I`` in Python floats (float64, the same
    operations as the tensor path); NaN weights for a non-finite ``G`` (``2×2`` nested list)."""
    (g00, g01), (g10, g11) = gram
    if not all(map(math.isfinite, (g00, g01, g10, g11))):
        return [math.nan, math.nan]
    tr = g00 + g11
    if tr > 0.0:
        q00, q11, q01 = g00 / tr + reg_eps, g11 / tr + reg_eps, (g01 + g10) * 0.5 / tr
    else:
        q00 = q11 = reg_eps
        q01 = 0.0
    den = (q00 + q11) - 2.0 * q01
    t = min(max((q11 - q01) / den, 0.0), 1.0) if den > 0.0 else 0.5
    return [t, 1.0 - t]


def mgda_weights(
    gram: Tensor,
    *,
    solver: Literal["active_set", "frank_wolfe"] = "active_set",
    iters: int = 20,
    reg_eps: float = 1e-10,
    epsilon: float = 1e-3,
    max_iters: int = 100,
    active: Tensor | None = None,
) -> Tensor:
    """MGDA weights ``argmin_{w ∈ Δ} wᵀ G w`` (over the active tasks).

    Args:
        gram: ``G`` (``K×K``).
        solver: ``"active_set"`` (exact; ``iters`` active-set steps on ``G/tr(G) + ρ·I``,
            ``ρ = max(reg_eps, K·eps)`` with ``eps`` that of ``G``'s dtype, so a float32
            Gramian's rounding cannot make the QP indefinite; two tasks: ``ρ = reg_eps``) or
            ``"frank_wolfe"`` (TorchJD's: ``epsilon``, ``max_iters``).
        active: optional ``(K,)`` bool mask.
    """
    k = check_gram(gram, "mgda_weights")
    check_active(active, k, "mgda_weights")
    if solver not in ("active_set", "frank_wolfe"):
        raise ValueError(
            f"mgda_weights: `solver` must be 'active_set' or 'frank_wolfe', got {solver!r}"
        )
    iters, max_iters = check_int("iters", iters, 1), check_int("max_iters", max_iters, 1)
    reg_eps, epsilon = check_nonnegative("reg_eps", reg_eps), check_positive("epsilon", epsilon)
    if k == 2 and active is None and solver == "active_set":
        host = host_values(gram)  # eager CPU: the closed form in Python floats
        if host is not None:
            return torch.tensor(_two_tasks_host(host, reg_eps), dtype=gram.dtype)
    g, a = restrict(gram, active)
    if active is not None:  # an empty mask selects nothing below
        a = torch.where(a.sum() > 0, a, torch.ones_like(a))
    if solver == "frank_wolfe":
        w = _frank_wolfe(g, a, epsilon, max_iters)
    elif k == 2 and active is None:
        w = _two_tasks(normalize_trace(g, 0.0) + reg_eps * eye_like(g))
    else:
        # a Gramian of float32 rows is only PSD to its rounding (eigenvalues ~±1e-8 of its trace
        # where rank-deficient): a ridge below that leaves the QP indefinite and the active-set
        # solver stalls at a vertex ~1 % off; K·eps of its dtype keeps it definite
        ridge = max(reg_eps, k * torch.finfo(gram.dtype).eps)
        q = normalize_trace(g, 0.0) + ridge * eye_like(g)
        w = simplex_qp(q, None, None if active is None else a, iters)
    if active is None:
        return finish(w, gram)
    return finish(w, gram, active.to(device=g.device, dtype=g.dtype))


mgda = from_weighting(mgda_weights, "mgda")
mgda.__doc__ = """MGDA on task-stacked ``grads``: ``Aggregated(Σ_k w_k g_k, w)``, keywords as
:func:`mgda_weights` plus an optional precomputed ``gram``."""
