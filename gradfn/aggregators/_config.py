"""ConFIG (Liu et al. 2024, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
Networks", Eq. 2), in K-space.

With unit rows ``ĝ_k = g_k/‖g_k‖`` (zero rows stay zero), the direction ``d = pinv(Û) p`` lies in
the row span: ``d = Ûᵀ Ĝ⁺ p`` with ``Ĝ = D⁻¹ G D⁻¹`` the Gramian of the unit rows, so
``d = Σ_k (β_k/‖g_k‖) g_k`` with ``β = Ĝ⁺ p``. The update is ``(Σ_k ⟨g_k, d̂⟩) · d̂`` with
``d̂ = d/‖d‖``. ``p`` defaults to ones. ``rcond`` is the relative singular-value cut-off of
``pinv(Û)`` (TorchJD: ``max(K, n)·eps``; :func:`config` passes that, the Gramian-only
:func:`config_weights` defaults to ``K·eps``, and so does the aggregator's ``weighting``, which
sees the Gramian alone); on ``Ĝ`` it is squared.

Rank deficiency (``K > n``, duplicated or dependent gradients): the eigenvalues of ``Ĝ`` that are
zero in exact arithmetic come out at the Gramian's rounding level, and inverting them gives a
direction of garbage (values ~1e25). So ``Ĝ``'s cut-off never falls below that level,
``√n·eps`` for a Gramian summed over ``n`` parameters (:func:`config`, which also accumulates the
Gramian of float32 gradients in float64, where their products are exact: dependent directions
then resolve as TorchJD's SVD resolves them), or ``1000·eps`` of the Gramian's dtype when ``n`` is
unknown (:func:`config_weights`: sums of up to ~10⁶ products; singular values below ~3% of the
largest (float32) count as dependent there).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradfn import tree
from gradfn._internal.checks import check_optional_nonnegative
from gradfn.aggregators._base import (
    Aggregated,
    check_active,
    check_grads,
    check_gram,
    check_gram_of,
    check_pref,
    finish,
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
    check_gram(gram, "config_weights")
    return _weights(gram, pref, rcond, active, floor=_FLOOR * torch.finfo(gram.dtype).eps)


_FLOOR = 1000.0  # ≈ √n for n = 10⁶: the rounding level of a Gramian entry, in eps (see above)


def _weights(
    gram: Tensor, pref: Tensor | None, rcond: float | None, active: Tensor | None, floor: float
) -> Tensor:
    """:func:`config_weights` with the cut-off on ``Ĝ`` at least ``floor`` (relative)."""
    k = check_gram(gram, "config_weights")
    check_active(active, k, "config_weights")
    check_pref(pref, k, "config_weights")
    rcond = check_optional_nonnegative("rcond", rcond)
    g, a = restrict(gram, active)
    p = a if pref is None else pref.to(device=g.device, dtype=g.dtype) * a
    if rcond is None:
        rcond = k * torch.finfo(gram.dtype).eps
    norms = torch.diagonal(g).clamp_min(0.0).sqrt()
    nz = norms > 0
    inv = torch.where(nz, 1.0 / torch.where(nz, norms, 1.0), 0.0)
    unit_gram = g * inv[:, None] * inv[None, :]
    rtol = max(rcond * rcond, floor, k * torch.finfo(g.dtype).eps)
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

    ``rcond`` defaults to TorchJD's ``max(K, n)·eps`` (``n`` the number of parameters). Without
    ``gram``, the Gramian is accumulated in float64 (exact products of float32 entries).
    """
    k = check_grads(grads, "config")
    rcond = check_optional_nonnegative("rcond", rcond)
    if gram is not None:
        check_gram_of(gram, k, "config")
    n = sum(x[0].numel() for x in tree.leaves(grads))
    if rcond is None:
        rcond = max(k, n) * torch.finfo(tree.leaves(grads)[0].dtype).eps
    g = tree.gramian(grads, dtype=torch.float64) if gram is None else gram
    floor = max(float(k), math.sqrt(n)) * torch.finfo(g.dtype).eps
    w = _weights(g, pref, rcond, active, floor)
    return Aggregated(tree.weighted_sum(grads, w), w.to(tree.leaves(grads)[0].dtype))


config.weights_fn = config_weights  # type: ignore[attr-defined]  # a weighting of the Gramian
