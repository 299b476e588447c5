"""IMTL-G (Liu et al. 2021, "Towards Impartial Multi-task Learning"), in the generalised form of
Quinton & Rey 2024 (TorchJD): ``v = G⁺ d`` with ``d_k = ‖g_k‖``, ``w = v / Σ v`` (0 when
``|Σ v|`` is negligible). The aggregate has equal projections onto every unit task gradient.

Computed on ``G / tr(G)`` so the ``|Σ v| < 1e-12`` cut-off is relative (TorchJD applies it to the
raw Gramian, so it zeroes the update for very large gradients); ``G⁺`` uses the relative
singular-value cut-off ``K·eps`` of the Gramian's dtype, as ``torch.linalg.pinv`` does.

Two tasks (eagerly on the CPU): ``v = Ĝ⁺ d`` in closed form. Full rank: ``Ĝ⁻¹ d ∝ (d₂, d₁)``
(``adj(Ĝ) d = (d₁d₂ − Ĝ₁₂)(d₂, d₁)``), so ``w = (‖g₂‖, ‖g₁‖) / (‖g₁‖ + ‖g₂‖)`` — Liu et al.'s
two-task solution: ``Σ_k w_k g_k`` has equal projections onto both unit gradients. Rank one:
``Ĝ⁺ = P₁/λ₁`` with the eigenprojector ``P₁ = (Ĝ − λ₂ I)/(λ₁ − λ₂)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradfn.aggregators._base import (
    _WORK,
    check_active,
    check_gram,
    eager_cpu,
    finish,
    from_weighting,
    host_values,
    normalize_trace,
    restrict_or_all,
)

__all__ = ["imtl_g", "imtl_g_weights"]


def _two_tasks_host(gram: list[list[float]], rtol: float) -> list[float]:
    """IMTL-G's ``w`` for ``K = 2`` in Python floats (float64), as the pinv path computes it:
    ``Ĝ = G/tr(G)``, eigenvalues ``λ = ½ ± √(((Ĝ₁₁ − Ĝ₂₂)/2)² + Ĝ₁₂²)`` kept when
    ``|λ| > rtol·max|λ|``; NaN weights for a non-finite ``G`` (``2×2`` nested list)."""
    (g00, g01), (g10, g11) = gram
    if not all(map(math.isfinite, (g00, g01, g10, g11))):
        return [math.nan, math.nan]
    tr = g00 + g11
    if not tr > 0.0:  # Ĝ = 0: G⁺d = 0
        return [0.0, 0.0]
    a, b, c = g00 / tr, g11 / tr, (g01 + g10) * 0.5 / tr
    d0, d1 = math.sqrt(max(a, 0.0)), math.sqrt(max(b, 0.0))
    mid, rad = (a + b) * 0.5, math.hypot((a - b) * 0.5, c)
    lam1, lam2 = mid + rad, mid - rad  # λ₁ ≥ ½ ≥ |λ₂| as a + b = 1
    if abs(lam2) > rtol * lam1:  # full rank: v = adj(Ĝ) d / det = (d₁d₂ − Ĝ₁₂)(d₂, d₁) / det
        total = (d0 + d1) * (d0 * d1 - c) / (lam1 * lam2)
        return [0.0, 0.0] if abs(total) < 1e-12 else [d1 / (d0 + d1), d0 / (d0 + d1)]
    # rank one: Ĝ⁺ = P₁/λ₁, v = (Ĝ − λ₂ I) d / ((λ₁ − λ₂) λ₁)
    s = (lam1 - lam2) * lam1
    v0, v1 = ((a - lam2) * d0 + c * d1) / s, (c * d0 + (b - lam2) * d1) / s
    total = v0 + v1
    if abs(total) < 1e-12:
        return [0.0, 0.0]
    return [v0 / total, v1 / total]


def _eager_cpu(gram: Tensor) -> Tensor | None:
    """The general path with its branches read back (free on the CPU): NaN for a non-finite
    ``G``, 0 for ``tr(G) ≤ 0``, else ``v = G⁻¹ d`` by Cholesky when ``‖G⁻¹‖_F tr(G) < 1/rtol``
    (so ``λ_min/λ_max > rtol``: ``pinv`` would cut nothing) and ``< 1e8`` (where the two agree to
    ~1e-8); ``w = v / Σv``, or 0 when ``|Σv| √tr(G) < 1e-12`` (the cut-off on ``G/tr(G)``).
    None where Cholesky does not apply: the ``pinv`` path decides."""
    k = gram.shape[0]
    g = gram.to(_WORK)
    total, tr = torch.stack([g.sum(), torch.trace(g)]).tolist()
    if not math.isfinite(total):
        return torch.full((k,), math.nan, dtype=gram.dtype)
    if not tr > 0.0:
        return torch.zeros(k, dtype=gram.dtype)
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) != 0:
        return None
    inv = torch.cholesky_inverse(chol)
    if not float(torch.linalg.matrix_norm(inv)) * tr < min(
        1.0 / (k * torch.finfo(gram.dtype).eps), 1e8
    ):
        return None
    v = inv @ torch.diagonal(g).clamp_min(0.0).sqrt()
    s = v.sum()
    if abs(float(s)) * math.sqrt(tr) < 1e-12:
        return torch.zeros(k, dtype=gram.dtype)
    return (v / s).to(gram.dtype)


def imtl_g_weights(gram: Tensor, *, active: Tensor | None = None) -> Tensor:
    """IMTL-G weights from the Gramian (``active``: optional ``(K,)`` bool mask)."""
    k = check_gram(gram, "imtl_g_weights")
    check_active(active, k, "imtl_g_weights")
    if k == 2 and active is None:
        host = host_values(gram)  # eager CPU: the closed form in Python floats
        if host is not None:
            rtol = 2 * torch.finfo(gram.dtype).eps
            return torch.tensor(_two_tasks_host(host, rtol), dtype=gram.dtype)
    if active is None and eager_cpu(gram):
        w = _eager_cpu(gram)
        if w is not None:
            return w
    g, a = restrict_or_all(gram, active)
    g = normalize_trace(g, 0.0)
    d = torch.diagonal(g).clamp_min(0.0).sqrt()
    rtol = k * torch.finfo(gram.dtype).eps
    v = torch.linalg.pinv(g, rtol=rtol, hermitian=True) @ d
    s = v.sum()
    w = torch.where(s.abs() < 1e-12, 0.0, v / s)  # v / 0 is never selected
    return finish(w, gram, a)


imtl_g = from_weighting(imtl_g_weights, "imtl_g")
imtl_g.__doc__ = """IMTL-G on task-stacked ``grads``: ``Aggregated(Σ_k w_k g_k, w)``, keywords as
:func:`imtl_g_weights` plus an optional precomputed ``gram``."""
