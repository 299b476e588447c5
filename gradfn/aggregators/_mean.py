"""Mean and Sum: the baselines (``w = 1/K`` and ``w = 1``)."""

from __future__ import annotations

import torch
from torch import Tensor

from gradfn import tree
from gradfn.aggregators._base import (
    Aggregated,
    check_active,
    check_grads,
    check_gram,
    combine,
    single_leaf,
)
from gradfn.typing import PyTree

__all__ = ["mean", "mean_weights", "sum_", "sum_weights"]


def _mask(k: int, active: Tensor | None, dtype: torch.dtype, device: torch.device) -> Tensor:
    if active is None:
        return torch.ones(k, dtype=dtype, device=device)
    return active.to(dtype=dtype, device=device)


def mean_weights(gram: Tensor, *, active: Tensor | None = None) -> Tensor:
    """``w_k = 1/|active|`` on the active tasks (all ``K`` by default), 0 elsewhere."""
    k = check_gram(gram, "mean_weights")
    check_active(active, k, "mean_weights")
    a = _mask(k, active, gram.dtype, gram.device)
    return a / a.sum().clamp_min(1.0)


def sum_weights(gram: Tensor, *, active: Tensor | None = None) -> Tensor:
    """``w_k = 1`` on the active tasks (all ``K`` by default), 0 elsewhere."""
    k = check_gram(gram, "sum_weights")
    check_active(active, k, "sum_weights")
    return _mask(k, active, gram.dtype, gram.device)


def _no_gram_weights(grads: PyTree, active: Tensor | None, fn: str, mean: bool) -> Tensor:
    k = check_grads(grads, fn)
    check_active(active, k, fn)
    ref = single_leaf(grads)
    if ref is None:
        ref = tree.leaves(grads)[0]
    dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
    if active is None:  # one op: the constant weights
        return torch.full((k,), 1.0 / k if mean else 1.0, dtype=dtype, device=ref.device)
    a = _mask(k, active, dtype, ref.device)
    return a / a.sum().clamp_min(1.0) if mean else a


def mean(grads: PyTree, *, active: Tensor | None = None, gram: Tensor | None = None) -> Aggregated:
    """``(1/K) Σ_k g_k`` over the active tasks. No Gramian is computed (``gram`` is ignored)."""
    del gram
    w = _no_gram_weights(grads, active, "mean", mean=True)
    return Aggregated(combine(grads, w), w)


def sum_(grads: PyTree, *, active: Tensor | None = None, gram: Tensor | None = None) -> Aggregated:
    """``Σ_k g_k`` over the active tasks. No Gramian is computed (``gram`` is ignored)."""
    del gram
    w = _no_gram_weights(grads, active, "sum_", mean=False)
    return Aggregated(combine(grads, w), w)


mean.weights_fn = mean_weights  # type: ignore[attr-defined]  # a weighting: no Gramian needed
sum_.weights_fn = sum_weights  # type: ignore[attr-defined]
