"""FAMO, Fast Adaptive Multitask Optimization (Liu et al. 2023, arXiv:2306.03792, Algorithm 1),
as its official implementation (``famo.py``: ``get_weighted_loss`` and ``update``).

Task logits ``ξ`` (``(K,)``, start at 0), ``z = softmax(ξ)``. With ``D_k = L_k − L_k^min + 1e-8``
the step's loss is ``Σ_k z_k log D_k / c``, ``c = Σ_k z_k / D_k`` (detached): its gradient is
that of ``Σ_k w_k L_k`` with ``w_k = z_k / (c D_k)``, the weights returned here (they sum to 1:
``Σ_k z_k / (c D_k) = c / c``). After the step, from the losses before (``L``) and after (``L'``):
``δ_k = log D_k(L) − log D_k(L')``, the logits' gradient ``∇_ξ = J_softmax(ξ)ᵀ δ = z ⊙ (δ −
zᵀδ)``, and ``ξ`` takes one Adam step (lr ``lr``, betas, eps) with L2 weight decay ``gamma``
(``torch.optim.Adam(weight_decay=gamma)``, as the official code). O(K) arithmetic per step, no
extra backward pass.

``update(state, losses)`` first updates ``ξ`` from the losses recorded at the previous call and
these (the next batch's losses stand for ``L'``: no extra forward), then weights ``losses`` and
records them. For the paper's exact ``L'`` (the same batch after the step), call
:func:`famo_update_logits` with it after the optimizer step; the next ``update`` then skips its
own logit update. A non-finite loss neither moves ``ξ`` nor is recorded (weights ``z`` then).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradfn._internal.checks import check_beta, check_float, check_nonnegative, check_positive
from gradfn.weighting._adam import AdamMoments, adam_step
from gradfn.weighting._base import LossWeighting, check_losses, task_count

__all__ = ["FAMOState", "famo", "famo_init", "famo_update_logits", "famo_weights"]

_EPS_D = 1e-8  # the official code's 1e-8 in D = L − L^min + 1e-8


class FAMOState(NamedTuple):
    """``logits`` ``ξ``, Adam's ``exp_avg`` / ``exp_avg_sq`` (``(K,)``) and ``step`` (0-d int64);
    ``prev`` the losses of the last weights (``(K,)``) and ``has_prev`` (0-d bool)."""

    logits: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    step: Tensor
    prev: Tensor
    has_prev: Tensor


def famo_init(
    num_tasks: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> FAMOState:
    """``ξ = 0`` (uniform ``z``), Adam moments 0, nothing recorded."""
    z = torch.zeros(num_tasks, dtype=dtype, device=device)
    i = torch.zeros((), dtype=torch.int64, device=device)
    no = torch.zeros((), dtype=torch.bool, device=device)
    return FAMOState(z, z.clone(), z.clone(), i, z.clone(), no)


def _d(losses: Tensor, min_losses: float | Tensor) -> Tensor:
    return losses - min_losses + _EPS_D


def famo_weights(
    state: FAMOState, losses: Tensor, *, min_losses: float | Tensor = 0.0
) -> tuple[FAMOState, Tensor]:
    """``(state, w)``: ``w_k = z_k / (c D_k)`` (module docstring), ``losses`` recorded."""
    losses = check_losses(losses, state.logits.shape[0], "famo_weights").detach()
    losses = losses.to(state.logits.dtype)
    z = torch.softmax(state.logits, dim=0)
    d = _d(losses, min_losses)
    ok = (torch.isfinite(losses) & (d > 0)).all()
    d_safe = torch.where(ok, d, torch.ones_like(d))
    c = (z / d_safe).sum()
    w = torch.where(ok, z / (c * d_safe), z)
    new = state._replace(
        prev=torch.where(ok, losses, state.prev), has_prev=ok | (state.has_prev & ~ok)
    )
    return new, w


def famo_update_logits(
    state: FAMOState,
    losses: Tensor,
    *,
    lr: float = 0.025,
    gamma: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    min_losses: float | Tensor = 0.0,
) -> FAMOState:
    """One Adam step of ``ξ`` from the recorded losses and ``losses`` (the losses after the
    step); a no-op without recorded losses or with a non-finite one. Clears the record."""
    losses = check_losses(losses, state.logits.shape[0], "famo_update_logits").detach()
    losses = losses.to(state.logits.dtype)
    d_new = _d(losses, min_losses)
    go = state.has_prev & (torch.isfinite(losses) & (d_new > 0)).all()
    delta = torch.log(_d(state.prev, min_losses)) - torch.log(torch.where(go, d_new, 1.0))
    delta = torch.where(go, delta, 0.0)
    xi = state.logits
    z = torch.softmax(xi, dim=0)
    moments = AdamMoments(state.exp_avg, state.exp_avg_sq, state.step)
    new_xi, (m, v, t) = adam_step(
        xi,
        z * (delta - (z * delta).sum()),
        moments,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=gamma,
    )
    return FAMOState(
        torch.where(go, new_xi, xi),
        torch.where(go, m, state.exp_avg),
        torch.where(go, v, state.exp_avg_sq),
        torch.where(go, t, state.step),
        state.prev,
        state.has_prev & ~go,
    )


def famo(
    *,
    lr: float = 0.025,
    gamma: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    min_losses: float | Tensor = 0.0,
) -> LossWeighting:
    """The FAMO :class:`LossWeighting`: ``lr`` and ``gamma`` are the logits' learning rate and
    weight decay (the official defaults 0.025 and 0.01), ``min_losses`` ``L^min`` (0, or known
    lower bounds of the losses)."""
    lr = check_positive("lr", lr)
    gamma = check_nonnegative("gamma", gamma)
    eps = check_positive("eps", eps)
    if not (isinstance(betas, tuple) and len(betas) == 2):
        raise TypeError(f"`betas` must be a pair of floats, got {betas!r}")
    betas = (check_beta("betas[0]", betas[0]), check_beta("betas[1]", betas[1]))
    if not isinstance(min_losses, Tensor):
        min_losses = check_float("min_losses", min_losses, -math.inf, math.inf)
    hp: dict[str, Any] = dict(lr=lr, gamma=gamma, betas=betas, eps=eps, min_losses=min_losses)

    def init(tasks: int | Tensor, *, device: torch.device | str | None = None) -> FAMOState:
        k, device = task_count(tasks, device)
        return famo_init(k, device=device)

    def update(state: FAMOState, losses: Tensor, params: Any = None) -> tuple[FAMOState, Tensor]:
        state = famo_update_logits(state, losses, **hp)
        return famo_weights(state, losses, min_losses=min_losses)

    return LossWeighting(init, update, "famo")
