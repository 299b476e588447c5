"""GradDrop (Chen et al. 2020, "Just Pick a Sign", Algorithm 1 lines 10–15), as in TorchJD.

Per coordinate, the positive sign purity ``P = ½(1 + Σ_k g_k / Σ_k |g_k|)``; with ``U ~ U[0,1)``
per coordinate, task ``k`` keeps its entry if ``f(P) > U`` and it is positive, or ``f(P) < U``
and it is negative; ``out = Σ_k (ℓ_k + (1 − ℓ_k) M_k) ⊙ g_k`` (``ℓ`` the leak, default 0).

Not a weighting of the rows: :class:`Aggregated` carries the per-task ``rows`` (their sum is the
update) and ``weights`` are ones. Randomness: ``U`` is drawn from ``seed`` with the counter-based
hash of :mod:`gradfn._internal.prng` (pure, device-independent), or passed in as ``noise`` (a pytree shaped
like one task's gradient).
"""

from __future__ import annotations

from collections.abc import Callable

import optree
import torch
from torch import Tensor

from gradfn._internal.checks import check_float, check_key, is_number
from gradfn._internal.compat import is_compiling
from gradfn._internal.prng import fold_in, uniform
from gradfn.aggregators._base import Aggregated, check_active, check_grads
from gradfn.typing import PyTree

__all__ = ["graddrop"]


def graddrop(
    grads: PyTree,
    *,
    seed: int | Tensor = 0,
    leak: Tensor | float | None = None,
    f: Callable[[Tensor], Tensor] | None = None,
    noise: PyTree | None = None,
    active: Tensor | None = None,
    gram: Tensor | None = None,
) -> Aggregated:
    """GradDrop on task-stacked ``grads``.

    Args:
        seed: seeds ``U`` (int or 0-d int64 tensor); ignored when ``noise`` is given.
        leak: ``(K,)`` leak values ``ℓ_k ∈ [0, 1]``, or one number in ``[0, 1]`` for every task
            (default zeros).
        f: monotone map applied to ``P`` (default identity).
        noise: optional ``U``: a pytree like one task's gradient, values in ``[0, 1)``.
        active: optional ``(K,)`` bool mask (inactive rows are dropped before ``P``).
        gram: ignored (GradDrop needs no Gramian).

    Returns:
        ``Aggregated(grad, ones(K), rows)`` with ``rows`` task-stacked and ``grad = Σ_k rows_k``.
        A NaN/inf entry makes the whole output NaN.
    """
    del gram
    k = check_grads(grads, "graddrop")
    check_active(active, k, "graddrop")
    seed = check_key("seed", seed)
    if leak is not None and not isinstance(leak, Tensor):
        if not is_number(leak):
            raise TypeError(f"graddrop: `leak` must be a ({k},) tensor or a number, got {leak!r}")
        leak = check_float("leak", leak, 0.0, 1.0, open_high=False)
        leak = None if leak == 0.0 else torch.full((k,), leak)
    elif leak is not None and leak.shape != (k,):
        raise ValueError(f"graddrop: `leak` must be a ({k},) tensor or a number")
    ls, spec = optree.tree_flatten(grads)
    if noise is not None:
        us = optree.tree_leaves(noise)
        if len(us) != len(ls) or any(u.shape != x.shape[1:] for u, x in zip(us, ls, strict=True)):
            raise ValueError("graddrop: `noise` must have the structure of one task's gradient")
    eager_cpu = ls[0].device.type == "cpu" and not is_compiling()
    rows_out = []
    bads = []
    for idx, x in enumerate(ls):
        m = x.reshape(k, -1)
        if active is not None:
            m = m * active.to(device=m.device, dtype=m.dtype)[:, None]
        total = m.sum(0)
        absum = m.abs().sum(0)
        bads.append(absum.sum())  # non-finite iff some entry is (or |g| sums overflow)
        # P = ½(1 + Σg/Σ|g|); an all-zero column divides 0 by the smallest subnormal: P = ½
        tiny = torch.finfo(m.dtype).smallest_normal * torch.finfo(m.dtype).eps
        p = 0.5 + 0.5 * (total / absum.clamp_min(tiny))
        fp = p if f is None else f(p)
        if noise is None:
            u = uniform(fold_in(seed, idx), (m.shape[1],), device=m.device, dtype=m.dtype)
        else:
            u = us[idx].reshape(-1).to(device=m.device, dtype=m.dtype)
        # keep a positive entry where f(P) > U, a negative one where f(P) < U: with s = sign(f(P)
        # − U) ∈ {−1, 0, 1}, an entry is kept iff s·g > 0, and relu(s·g)·s is g there, 0 elsewhere
        sgn = torch.sign(fp - u)
        if m.requires_grad and torch.is_grad_enabled():  # differentiable: out of place
            r = (m * sgn).clamp_min(0.0) * sgn
        else:  # fresh buffers: in place, no K × n allocations beyond the first
            r = (m * sgn).clamp_min_(0.0).mul_(sgn)
        if leak is not None:  # ℓ g + (1 − ℓ) M g
            lk = leak.to(device=m.device, dtype=m.dtype)[:, None]
            r = torch.addcmul(r * (1.0 - lk), lk, m)
        rows_out.append(r.reshape(x.shape))
    bad = ~torch.isfinite(torch.stack(bads).sum()) if len(bads) > 1 else ~torch.isfinite(bads[0])
    if not eager_cpu:  # no host sync: NaN every row through a select
        rows_out = [torch.where(bad, float("nan"), r) for r in rows_out]
    elif bool(bad):
        rows_out = [torch.full_like(r, float("nan")) for r in rows_out]
    rows = optree.tree_unflatten(spec, rows_out)
    grad = optree.tree_map(lambda r: r.sum(0), rows)
    ref = ls[0]
    dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
    return Aggregated(grad, torch.ones(k, dtype=dtype, device=ref.device), rows)
