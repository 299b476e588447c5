"""Built-in in-group gradient transforms of SON-GOKU (spec §1.6), in K×K coefficient space.

Both act on the Gramian ``G`` of the active group's shared gradients, never on the gradients
themselves, so they cost ``O(K²)`` beyond the Gramian:

* PCGrad (Yu et al., 2020) restricted to the active group: each task ``i`` visits the other
  active tasks in a seeded random order and, when ``<g_i, g_j> < 0``, removes from ``g_i`` its
  component along the *original* ``g_j``. Every projection is linear in the original gradients, so
  the result is tracked as coefficients: ``g_i^PC = Σ_j C_ij g_j``.
* The reference's ``"adatask"`` (inverse gradient-norm weighting): per-task EMA of ``‖g_i‖`` (only
  while active) and weights ``w_i ∝ 1/ema_i`` normalised to mean 1 over the group.

Tensor-only with fixed loop lengths (``K``), so they trace under ``torch.compile``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradfn.sketch import _MASK, _mix

__all__ = ["inverse_norm_weights", "pcgrad_coefficients", "pcgrad_order"]


def pcgrad_order(seed: Tensor, counter: Tensor, num_tasks: int) -> Tensor:
    """Per-task visiting orders ``(K, K)`` int64: row ``i`` is a permutation of ``0..K−1``.

    A deterministic hash of ``(seed, counter, i, j)`` (0-d int64 tensors ``seed``, ``counter``),
    so the order is reproducible from the state and changes every step.
    """
    k = num_tasks
    device = seed.device
    base = _mix(
        (_mix(seed.to(torch.int64) & _MASK) ^ (counter.to(torch.int64) * 0x3C6EF372)) & _MASK
    )
    ids = torch.arange(k * k, dtype=torch.int64, device=device).reshape(k, k)
    keys = _mix((ids * 0x27D4EB2F + base) & _MASK)
    return torch.sort(keys, dim=1, stable=True).indices


def pcgrad_coefficients(gram: Tensor, active: Tensor, order: Tensor) -> Tensor:
    """PCGrad inside the active group as coefficients ``C`` (K×K): ``g_i^PC = Σ_j C_ij g_j``.

    ``gram`` (K×K) is ``<g_i, g_j>``; ``active`` (K,) bool; ``order`` (K×K) from
    :func:`pcgrad_order`. For each task ``i`` and each ``j = order[i, pos]`` (``j ≠ i``, both
    active): if ``<g_i^cur, g_j> < 0`` then ``g_i^cur −= <g_i^cur, g_j> / max(‖g_j‖², 1e-12) g_j``.
    Rows of inactive tasks stay the identity.
    """
    k = gram.shape[0]
    g = gram.to(torch.float64)
    ids = torch.arange(k, device=gram.device)
    coeffs = torch.eye(k, dtype=torch.float64, device=gram.device)
    for pos in range(k):
        j = order[:, pos]
        dots = (coeffs @ g)[ids, j]  # <g_i^cur, g_j>
        cond = active & active[j] & (j != ids) & (dots < 0)
        coef = torch.where(cond, dots / g[j, j].clamp(min=1e-12), torch.zeros_like(dots))
        coeffs = coeffs.index_put((ids, j), coeffs[ids, j] - coef)
    return coeffs.to(gram.dtype)


def inverse_norm_weights(
    gram: Tensor, active: Tensor, norm_ema: Tensor, beta: float = 0.9
) -> tuple[Tensor, Tensor]:
    """The reference's ``"adatask"`` weights. Returns ``(weights (K,), new norm_ema (K,))``.

    ``n_i = ‖g_i‖ + 1e-8``; for active tasks ``ema_i ← n_i`` the first time (``ema_i == 0``),
    else ``ema_i ← β ema_i + (1−β) n_i``; ``w_i = (1/max(ema_i, 1e-8)) · |S| / (Σ_{j∈S}
    1/max(ema_j, 1e-8) + 1e-8)`` for active ``i`` (mean ≈ 1 over the group), 0 otherwise.
    """
    norms = torch.sqrt(torch.diagonal(gram).to(norm_ema.dtype).clamp(min=0)) + 1e-8
    fresh = norm_ema == 0
    updated = torch.where(fresh, norms, beta * norm_ema + (1 - beta) * norms)
    new_ema = torch.where(active, updated, norm_ema)
    inv = 1.0 / new_ema.clamp(min=1e-8)
    inv_active = torch.where(active, inv, torch.zeros_like(inv))
    count = active.to(inv.dtype).sum()
    weights = inv_active * count / (inv_active.sum() + 1e-8)
    return weights, new_ema
