"""Inverse gradient-norm weighting: the in-group weighting of SON-GOKU's reference implementation
(its ``base_method="adatask"``; arXiv:2509.16959 pairs SON-GOKU with AdaTask), stateful.

Per task, an EMA of the gradient norm ``n_i = ‖g_i‖ + 1e-8`` (started at the first ``n_i``, updated
only while the task is active) and weights ``w_i ∝ 1/ema_i`` normalised to mean 1 over the active
tasks: ``w_i = (1/max(ema_i, 1e-8)) · |S| / (Σ_{j∈S} 1/max(ema_j, 1e-8) + 1e-8)``. Large-gradient
tasks are damped, small ones boosted. The state is the ``(K,)`` EMA (0 before a task's first
update), in float32, or float64 once it has seen float64 gradients (a float64 Gramian).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from gradfn._internal.checks import check_beta
from gradfn.aggregators._base import Aggregator, check_active, check_gram, from_stateful_weighting

__all__ = ["InverseNormState", "inverse_norm", "inverse_norm_init", "inverse_norm_weights"]


class InverseNormState(NamedTuple):
    """``norm_ema``: ``(K,)`` EMA of the task gradient norms (0: not seen yet); float32, or
    float64 for float64 gradients."""

    norm_ema: Tensor


def inverse_norm_init(
    num_tasks: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> InverseNormState:
    """Zero EMAs for ``num_tasks`` tasks (``dtype``: float32, or float64 for float64 gradients;
    a float32 state is widened by the first float64 Gramian anyway)."""
    return InverseNormState(torch.zeros(num_tasks, dtype=dtype, device=device))


def inverse_norm_weights(
    state: InverseNormState,
    gram: Tensor,
    *,
    beta: float = 0.9,
    active: Tensor | None = None,
) -> tuple[InverseNormState, Tensor]:
    """One step on the Gramian: ``(new_state, w)`` (module docstring); inactive tasks keep their
    EMA and get weight 0. The EMA is kept in the wider of its dtype and the Gramian's (a float64
    Gramian makes it float64)."""
    k = check_gram(gram, "inverse_norm_weights")
    check_active(active, k, "inverse_norm_weights")
    on = torch.ones(k, dtype=torch.bool, device=gram.device) if active is None else active
    ema = state.norm_ema
    if gram.is_floating_point():
        ema = ema.to(torch.promote_types(ema.dtype, gram.dtype))
    norms = torch.sqrt(torch.diagonal(gram).to(ema.dtype).clamp(min=0)) + 1e-8
    updated = torch.where(ema == 0, norms, beta * ema + (1 - beta) * norms)
    new_ema = torch.where(on, updated, ema)
    inv = 1.0 / new_ema.clamp(min=1e-8)
    inv_active = torch.where(on, inv, torch.zeros_like(inv))
    count = on.to(inv.dtype).sum()
    weights = inv_active * count / (inv_active.sum() + 1e-8)
    finite = torch.isfinite(gram).all()
    kept = torch.where(finite, new_ema, ema)
    w = torch.where(finite, weights, torch.full_like(weights, float("nan")))
    return InverseNormState(kept), w.to(gram.dtype)


def inverse_norm(*, beta: float = 0.9) -> Aggregator:
    """The inverse-norm :class:`Aggregator` (stateful); ``beta`` is the norm EMA's factor."""
    beta = check_beta("beta", beta)

    def weights(
        state: InverseNormState, gram: Tensor, *, active: Tensor | None = None
    ) -> tuple[InverseNormState, Tensor]:
        return inverse_norm_weights(state, gram, beta=beta, active=active)

    return from_stateful_weighting(inverse_norm_init, weights, "inverse_norm")
