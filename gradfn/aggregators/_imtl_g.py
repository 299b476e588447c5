"""IMTL-G (Liu et al. 2021, "Towards Impartial Multi-task Learning"), in the generalised form of
Quinton & Rey 2024 (TorchJD): ``v = G⁺ d`` with ``d_k = ‖g_k‖``, ``w = v / Σ v`` (0 when
``|Σ v|`` is negligible). The aggregate has equal projections onto every unit task gradient.

Computed on ``G / tr(G)`` so the ``|Σ v| < 1e-12`` cut-off is relative (TorchJD applies it to the
raw Gramian, so it zeroes the update for very large gradients); ``G⁺`` uses the relative
singular-value cut-off ``K·eps`` of the Gramian's dtype, as ``torch.linalg.pinv`` does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradfn.aggregators._base import (
    check_active,
    check_gram,
    finish,
    from_weighting,
    normalize_trace,
    restrict_or_all,
)

__all__ = ["imtl_g", "imtl_g_weights"]


def imtl_g_weights(gram: Tensor, *, active: Tensor | None = None) -> Tensor:
    """IMTL-G weights from the Gramian (``active``: optional ``(K,)`` bool mask)."""
    k = check_gram(gram, "imtl_g_weights")
    check_active(active, k, "imtl_g_weights")
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
