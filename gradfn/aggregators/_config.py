"""ConFIG (Liu et al. 2024, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
Networks", Eq. 2), in K-space.

With unit rows ``ĝ_k = g_k/‖g_k‖`` (zero rows stay zero), the direction ``d = pinv(Û) p`` lies in
the row span: ``d = Ûᵀ Ĝ⁺ p`` with ``Ĝ = D⁻¹ G D⁻¹`` the Gramian of the unit rows, so
``d = Σ_k (β_k/‖g_k‖) g_k`` with ``β = Ĝ⁺ p``. The update is ``(Σ_k ⟨g_k, d̂⟩) · d̂`` with
``d̂ = d/‖d‖``. ``p`` defaults to ones. ``rcond`` is the relative singular-value cut-off of
``pinv(Û)`` (TorchJD: ``max(K, n)·eps``; :func:`config` passes that, the Gramian-only
:func:`config_weights` defaults to ``K·eps``, and so does the aggregator's ``weighting``, which
sees the Gramian alone); on ``Ĝ`` it is squared.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradfn import tree
from gradfn.aggregators._base import (
    Aggregated,
    check_active,
    check_grads,
    check_gram,
    check_pref,
    finish,
    gramian_of,
    restrict,
)
from gradfn.typing import PyTree

__all__ = ["config", "config_weights"]


def config_weights(
    gram: Tensor,
    *,
    pref: Tensor | None = None,
    rcond: float | None = None,
    active: Tensor | None = None,
) -> Tensor:
    """ConFIG weights from the Gramian (``active``: optional ``(K,)`` bool mask)."""
    k = check_gram(gram, "config_weights")
    check_active(active, k, "config_weights")
    check_pref(pref, k, "config_weights")
    g, a = restrict(gram, active)
    p = a if pref is None else pref.to(device=g.device, dtype=g.dtype) * a
    if rcond is None:
        rcond = k * torch.finfo(gram.dtype).eps
    norms = torch.diagonal(g).clamp_min(0.0).sqrt()
    nz = norms > 0
    inv = torch.where(nz, 1.0 / torch.where(nz, norms, 1.0), 0.0)
    unit_gram = g * inv[:, None] * inv[None, :]
    rtol = max(rcond * rcond, k * torch.finfo(g.dtype).eps)
    beta = torch.linalg.pinv(unit_gram, rtol=rtol, hermitian=True) @ p
    w_dir = beta * inv
    sq = (w_dir @ g @ w_dir).clamp_min(0.0)
    w_unit = w_dir / sq.sqrt().clamp_min(1e-12)
    length = (g @ w_unit).sum()
    return finish(length * w_unit, gram, a)


def config(
    grads: PyTree,
    *,
    pref: Tensor | None = None,
    rcond: float | None = None,
    active: Tensor | None = None,
    gram: Tensor | None = None,
) -> Aggregated:
    """ConFIG on task-stacked ``grads``: ``Aggregated(Σ_k w_k g_k, w)``.

    ``rcond`` defaults to TorchJD's ``max(K, n)·eps`` (``n`` the number of parameters).
    """
    k = check_grads(grads, "config")
    if rcond is None:
        n = sum(x[0].numel() for x in tree.leaves(grads))
        rcond = max(k, n) * torch.finfo(tree.leaves(grads)[0].dtype).eps
    g = gramian_of(grads) if gram is None else gram
    w = config_weights(g, pref=pref, rcond=rcond, active=active)
    return Aggregated(tree.weighted_sum(grads, w), w)


config.weights_fn = config_weights  # type: ignore[attr-defined]  # a weighting of the Gramian
