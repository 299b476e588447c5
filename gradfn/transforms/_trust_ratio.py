"""GCond's "Lion" branch (arXiv:2509.07252): sign of the update times a clipped trust ratio."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch
from torch import Tensor

from gradfn._internal.checks import check_callable, check_nonnegative, check_positive
from gradfn.transforms._base import EmptyState, GradientTransform, chain
from gradfn.transforms._moments import momentum
from gradfn.typing import PyTree

__all__ = ["lion", "sign_trust_ratio"]


def sign_trust_ratio(
    coef: float = 1e-4,
    clip: float = 100.0,
    *,
    eps: float = 1e-8,
    psum: Callable[[Tensor], Tensor] | None = None,
) -> GradientTransform:
    """Per tensor: ``sign(u)·τ·coef`` with ``τ = min(‖p‖/‖u‖, clip)`` if both norms are
    ``≥ eps``, else ``min(1, clip)``. Needs ``params``.

    ``psum``: sums a tensor over the ranks that each hold a shard of every ``u`` and ``p`` (FSDP):
    the ``2P`` squared norms of the shards are summed in one call, so ``τ`` is the full tensors'.
    """
    coef = check_positive("coef", coef)
    clip = check_positive("clip", clip)
    eps = check_nonnegative("eps", eps)
    check_callable("psum", psum, optional=True)

    def init(params: PyTree) -> EmptyState:
        return EmptyState()

    def one(u: Tensor, p: Tensor) -> Tensor:
        pn = torch.linalg.vector_norm(p.float())
        un = torch.linalg.vector_norm(u.float())
        return scaled(u, pn, un)

    def scaled(u: Tensor, pn: Tensor, un: Tensor) -> Tensor:
        ok = (pn >= eps) & (un >= eps)
        tau = torch.where(ok, pn / torch.where(ok, un, torch.ones_like(un)), torch.ones_like(un))
        tau = torch.clamp(tau, max=clip)
        return (torch.sign(u.float()) * tau * coef).to(u.dtype)

    def update(
        state: EmptyState, updates: PyTree, params: PyTree = None, **extra: Any
    ) -> tuple[EmptyState, PyTree]:
        if params is None:
            raise ValueError("sign_trust_ratio: `params` is required (the trust ratio uses ‖p‖)")
        if psum is None:
            return state, optree.tree_map(one, updates, params)
        us, spec = optree.tree_flatten(updates)
        ps = spec.flatten_up_to(params)
        sq = [torch.linalg.vector_norm(x.float()) ** 2 for x in (*ps, *us)]
        norms = torch.sqrt(psum(torch.stack(sq)))
        n = len(us)
        out = [scaled(u, norms[i], norms[n + i]) for i, u in enumerate(us)]
        return state, optree.tree_unflatten(spec, out)

    return GradientTransform(init, update)


def lion(
    beta: float = 0.85,
    coef: float = 1e-4,
    clip: float = 100.0,
    *,
    eps: float = 1e-8,
    dtype: torch.dtype = torch.float32,
    psum: Callable[[Tensor], Tensor] | None = None,
) -> GradientTransform:
    """GCond's ``use_lion=True`` path: bias-corrected :func:`~gradfn.transforms.momentum`, then
    :func:`sign_trust_ratio` of the corrected moment (not the two-β Lion of Chen et al. 2023);
    ``psum``: as in :func:`sign_trust_ratio` (sharded parameters)."""
    return chain(momentum(beta, dtype=dtype), sign_trust_ratio(coef, clip, eps=eps, psum=psum))
