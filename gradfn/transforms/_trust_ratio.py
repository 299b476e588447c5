"""GCond's "Lion" branch (arXiv:2509.07252): sign of the update times a clipped trust ratio."""

from __future__ import annotations

from typing import Any

import optree
import torch
from torch import Tensor

from gradfn._internal.checks import check_nonnegative, check_positive
from gradfn.transforms._base import EmptyState, GradientTransform, chain
from gradfn.transforms._moments import momentum
from gradfn.typing import PyTree

__all__ = ["lion", "sign_trust_ratio"]


def sign_trust_ratio(
    coef: float = 1e-4, clip: float = 100.0, *, eps: float = 1e-8
) -> GradientTransform:
    """Per tensor: ``sign(u)·τ·coef`` with ``τ = min(‖p‖/‖u‖, clip)`` if both norms are
    ``≥ eps``, else ``min(1, clip)``. Needs ``params``."""
    coef = check_positive("coef", coef)
    clip = check_positive("clip", clip)
    eps = check_nonnegative("eps", eps)

    def init(params: PyTree) -> EmptyState:
        return EmptyState()

    def one(u: Tensor, p: Tensor) -> Tensor:
        pn = torch.linalg.vector_norm(p.float())
        un = torch.linalg.vector_norm(u.float())
        ok = (pn >= eps) & (un >= eps)
        tau = torch.where(ok, pn / torch.where(ok, un, torch.ones_like(un)), torch.ones_like(un))
        tau = torch.clamp(tau, max=clip)
        return (torch.sign(u.float()) * tau * coef).to(u.dtype)

    def update(
        state: EmptyState, updates: PyTree, params: PyTree = None, **extra: Any
    ) -> tuple[EmptyState, PyTree]:
        if params is None:
            raise ValueError("sign_trust_ratio: `params` is required (the trust ratio uses ‖p‖)")
        return state, optree.tree_map(one, updates, params)

    return GradientTransform(init, update)


def lion(
    beta: float = 0.85,
    coef: float = 1e-4,
    clip: float = 100.0,
    *,
    eps: float = 1e-8,
    dtype: torch.dtype = torch.float32,
) -> GradientTransform:
    """GCond's ``use_lion=True`` path: bias-corrected :func:`~gradfn.transforms.momentum`, then
    :func:`sign_trust_ratio` of the corrected moment (not the two-β Lion of Chen et al. 2023)."""
    return chain(momentum(beta, dtype=dtype), sign_trust_ratio(coef, clip, eps=eps))
