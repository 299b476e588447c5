"""Norm clipping: GCond's per-loss cap (arXiv:2509.07252) and a global cap."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradfn import tree
from gradfn._internal.checks import check_nonnegative, check_positive
from gradfn.transforms._base import EmptyState, GradientTransform
from gradfn.typing import PyTree

__all__ = ["cap_factors", "norm_cap", "scale_rows", "task_norms"]


def task_norms(updates: PyTree, per_task: bool) -> Tensor:
    """Global L2 norm (float32): one 0-d value, or ``(K,)`` over the leading axis if ``per_task``."""
    if not per_task:
        return tree.tree_norm(updates)
    ls = tree.leaves(updates)
    k = ls[0].shape[0]
    sq = torch.stack([(x.reshape(k, -1).float() ** 2).sum(1) for x in ls]).sum(0)
    return torch.sqrt(sq)


def cap_factors(norms: Tensor, max_norm: float | None, eps: float) -> Tensor:
    """The clip factor ``cap/(‖g‖+eps)`` where ``‖g‖ > cap``, else 1 (never scales up)."""
    if max_norm is None:
        return torch.ones_like(norms)
    return torch.where(norms > max_norm, max_norm / (norms + eps), torch.ones_like(norms))


def scale_rows(updates: PyTree, factors: Tensor, per_task: bool) -> PyTree:
    """Every leaf times ``factors`` (0-d), or row ``k`` of every leaf times ``factors[k]``."""
    if not per_task:
        return tree.tree_map(lambda x: x * factors.to(x.dtype), updates)
    return tree.tree_map(
        lambda x: x * factors.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1)), updates
    )


def norm_cap(max_norm: float, *, per_task: bool = False, eps: float = 1e-8) -> GradientTransform:
    """Clip the global norm to ``max_norm``: ``u ← u·max_norm/(‖u‖+eps)`` if ``‖u‖ > max_norm``.

    ``per_task``: each slice of the leading task axis separately (GCond's per-loss cap).
    """
    cap = check_positive("max_norm", max_norm)
    eps = check_nonnegative("eps", eps)

    def init(params: PyTree) -> EmptyState:
        return EmptyState()

    def update(
        state: EmptyState, updates: PyTree, params: PyTree = None, **extra: Any
    ) -> tuple[EmptyState, PyTree]:
        factors = cap_factors(task_norms(updates, per_task), cap, eps)
        return state, scale_rows(updates, factors, per_task)

    return GradientTransform(init, update)
