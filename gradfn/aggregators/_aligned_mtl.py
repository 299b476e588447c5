"""Aligned-MTL (Senushkin et al. 2023, "Independent Component Alignment for Multi-Task Learning",
Algorithm 1), as in TorchJD: with ``G = V Λ Vᵀ`` restricted to its numerical rank ``r``
(``λ > λ_max·K·eps``), the balance transform ``B = √σ · V Λ^{-1/2} Vᵀ`` with ``σ`` the smallest
(``"min"``), median (``"median"``, the lower one) or mean (``"rmse"``) kept eigenvalue, and
``w = B u`` (``u`` the preference, uniform by default). Rank 0 gives ``w = u``. The rank is a
mask, not a slice, so the function traces with static shapes.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from gradfn.aggregators._base import (
    check_active,
    check_gram,
    check_pref,
    finish,
    from_weighting,
    pref_or_mean,
    restrict_or_all,
)

__all__ = ["aligned_mtl", "aligned_mtl_weights"]

_MODES = ("min", "median", "rmse")


def aligned_mtl_weights(
    gram: Tensor,
    *,
    pref: Tensor | None = None,
    scale_mode: Literal["min", "median", "rmse"] = "min",
    active: Tensor | None = None,
) -> Tensor:
    """Aligned-MTL weights from the Gramian (``active``: optional ``(K,)`` bool mask)."""
    k = check_gram(gram, "aligned_mtl_weights")
    check_active(active, k, "aligned_mtl_weights")
    check_pref(pref, k, "aligned_mtl_weights")
    if scale_mode not in _MODES:
        raise ValueError(
            f"aligned_mtl_weights: `scale_mode` must be one of {_MODES}, got {scale_mode!r}"
        )
    g, a = restrict_or_all(gram, active)
    u = pref_or_mean(pref, a, g)
    lam, vec = torch.linalg.eigh(g)
    tol = lam.max() * k * torch.finfo(gram.dtype).eps
    keep = lam > tol
    rank = keep.sum()
    safe = torch.where(keep, lam, 1.0)
    inv_sqrt = torch.where(keep, safe.rsqrt(), 0.0)
    if scale_mode == "min":
        scale = torch.where(keep, lam, float("inf")).min()
    elif scale_mode == "rmse":
        scale = torch.where(keep, lam, 0.0).sum() / rank.clamp_min(1)
    else:
        desc = torch.sort(torch.where(keep, lam, float("-inf")), descending=True).values
        idx = (rank - 1 - (rank - 1) // 2).clamp_min(0)
        scale = desc.gather(0, idx.reshape(1))[0]
    scale = torch.where(rank > 0, scale, 1.0).clamp_min(0.0)
    b = scale.sqrt() * (vec * inv_sqrt[None, :]) @ vec.T
    w = torch.where(rank > 0, b @ u, u)
    return finish(w, gram, a)


aligned_mtl = from_weighting(aligned_mtl_weights, "aligned_mtl")
aligned_mtl.__doc__ = """Aligned-MTL on task-stacked ``grads``: ``Aggregated(Σ_k w_k g_k, w)``,
keywords as :func:`aligned_mtl_weights` plus an optional precomputed ``gram``."""
