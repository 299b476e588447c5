"""PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning", Algorithm 1), in K-space.

Each projected gradient is a combination of the originals, ``g_i^PC = Σ_j C_ij g_j``; projecting
``g_i^PC`` off a conflicting ``g_j`` (``⟨g_i^PC, g_j⟩ < 0``) is ``C_ij -= ⟨g_i^PC, g_j⟩ / ‖g_j‖²``
with ``⟨g_i^PC, g_j⟩ = (C G)_ij``. All ``K`` rows advance together, one visiting step at a time
(``K`` vectorised steps, no Python branch on data), and the result is ``Σ_i g_i^PC``:
weights ``w = 1ᵀ C`` (``reduction="mean"``: ``Σ_i g_i^PC / K``, the average many PCGrad
implementations return). The visiting order of each row is a random permutation drawn from
``seed`` (or given explicitly as ``order``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradfn._internal.checks import check_key
from gradfn._internal.prng import permutations
from gradfn.aggregators._base import (
    check_active,
    check_gram,
    finish,
    from_weighting,
    restrict_or_all,
)

__all__ = ["pcgrad", "pcgrad_weights"]


def pcgrad_weights(
    gram: Tensor,
    *,
    seed: int | Tensor = 0,
    order: Tensor | None = None,
    active: Tensor | None = None,
    reduction: str = "sum",
) -> Tensor:
    """PCGrad weights from the Gramian.

    Args:
        gram: ``G`` (``K×K``).
        seed: seeds the visiting orders (int or 0-d int64 tensor).
        order: optional ``(K, K)`` int tensor; row ``i`` is the order in which task ``i`` visits
            the tasks (a permutation of ``range(K)``; the entry ``i`` itself is skipped).
        active: optional ``(K,)`` bool mask.
        reduction: ``"sum"`` (Yu et al.) or ``"mean"`` of the projected gradients over the
            active tasks.

    Returns:
        ``w`` (``K,``) with ``Σ_i g_i^PC = Σ_k w_k g_k`` (divided by the number of active tasks
        with ``reduction="mean"``).
    """
    k = check_gram(gram, "pcgrad_weights")
    check_active(active, k, "pcgrad_weights")
    seed = check_key("seed", seed)
    if reduction not in ("sum", "mean"):
        raise ValueError(f"pcgrad_weights: `reduction` must be 'sum' or 'mean', got {reduction!r}")
    g, a = restrict_or_all(gram, active)
    if order is not None and order.shape != (k, k):
        raise ValueError(f"pcgrad_weights: `order` must be ({k}, {k}), got {tuple(order.shape)}")
    if k == 2 and a is None:  # one step per row, any order: w_i = 1 − ⟨g_1, g_2⟩ / ‖g_i‖²
        d = torch.diagonal(g)
        g12 = g[0, 1]
        w = torch.where((g12 < 0) & (d > 0), 1.0 - g12 / d, 1.0)
        return finish(w * 0.5 if reduction == "mean" else w, gram)
    if order is None and k <= 2:  # one other task to visit: every order gives the same result
        order = torch.arange(k, device=g.device).expand(k, k)
    elif order is None:
        order = permutations(seed, k, k, device=g.device)
    order = order.to(device=g.device, dtype=torch.int64)
    rows = torch.arange(k, device=g.device)
    c = torch.eye(k, dtype=g.dtype, device=g.device)
    # everything that depends on the visiting order only, for all K steps at once
    valid = order != rows[:, None]  # (K, K): row i, step t
    if a is not None:
        on = a > 0
        valid = valid & on[:, None] & on[order]
    diag = torch.diagonal(g)
    gjj = diag[order]
    gjj = torch.where(gjj > 0, gjj, 1.0)
    g_ord = g[order]  # (K, K, K): [i, t] = row j = order[i, t] of G
    e_ord = c[order]  # (K, K, K): [i, t] = e_j
    for t in range(k):
        ip = (g_ord[:, t] * c).sum(1)  # ⟨g_i^PC, g_j⟩
        step = torch.where(valid[:, t] & (ip < 0), -ip / gjj[:, t], 0.0)
        c = c + step[:, None] * e_ord[:, t]
    if a is None:
        w = c.sum(0)
        return finish(w / k if reduction == "mean" else w, gram)
    w = (c * a[:, None]).sum(0)
    if reduction == "mean":
        w = w / a.sum().clamp_min(1.0)
    return finish(w, gram, a)


pcgrad = from_weighting(pcgrad_weights, "pcgrad")
pcgrad.__doc__ = """PCGrad on task-stacked ``grads``: ``Aggregated(Σ_i g_i^PC, w)``.

Keywords as :func:`pcgrad_weights` (``seed``, ``order``, ``active``, ``reduction``) plus an
optional precomputed ``gram``.
"""
