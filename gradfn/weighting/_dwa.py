"""Dynamic Weight Average (Liu et al. 2019, *End-to-End Multi-Task Learning with Attention*,
arXiv:1803.10704, Eq. 7).

``w_k(t) = K · exp(r_k(t−1)/T) / Σ_j exp(r_j(t−1)/T)`` with ``r_k(t−1) = L_k(t−1) / L_k(t−2)``,
the ratio of a task's last two recorded losses; ``w = 1`` until two losses are recorded. The
weights sum to ``K``; a task whose loss falls more slowly gets more weight. The paper records
the epoch-mean losses (call :func:`dwa_observe` once per epoch and :func:`dwa_weights` at every
step); ``update`` does both per call (weights from the history, then records ``losses``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradfn._internal.checks import check_positive
from gradfn.weighting._base import LossWeighting, check_losses, task_count

__all__ = ["DWAState", "dwa", "dwa_init", "dwa_observe", "dwa_weights"]


class DWAState(NamedTuple):
    """``last``, ``before``: ``(K,)`` the last two recorded losses ``L(t−1)``, ``L(t−2)``;
    ``count``: 0-d int64, how many were recorded."""

    last: Tensor
    before: Tensor
    count: Tensor  # type: ignore[assignment]  # a field named like tuple.count


def dwa_init(
    num_tasks: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> DWAState:
    """No losses recorded."""
    ones = torch.ones(num_tasks, dtype=dtype, device=device)
    return DWAState(ones, ones.clone(), torch.zeros((), dtype=torch.int64, device=device))


def dwa_weights(state: DWAState, *, temperature: float = 2.0) -> Tensor:
    """``(K,)`` weights from the recorded history (module docstring)."""
    k = state.last.shape[0]
    r = state.last / state.before
    w = k * torch.softmax(r / temperature, dim=0)
    return torch.where(state.count >= 2, w, torch.ones_like(w))


def dwa_observe(state: DWAState, losses: Tensor) -> DWAState:
    """Record ``losses`` (``(K,)``); a non-finite or non-positive one leaves the state as it is
    (the ratio needs positive losses)."""
    losses = check_losses(losses, state.last.shape[0], "dwa_observe").detach()
    losses = losses.to(state.last.dtype)
    ok = (torch.isfinite(losses) & (losses > 0)).all()
    return DWAState(
        torch.where(ok, losses, state.last),
        torch.where(ok, state.last, state.before),
        state.count + ok.to(torch.int64),
    )


def dwa(*, temperature: float = 2.0) -> LossWeighting:
    """The DWA :class:`LossWeighting`; ``temperature`` is ``T`` (the paper uses 2)."""
    temperature = check_positive("temperature", temperature)

    def init(tasks: int | Tensor, *, device: torch.device | str | None = None) -> DWAState:
        k, device = task_count(tasks, device)
        return dwa_init(k, device=device)

    def update(state: DWAState, losses: Tensor, params: Any = None) -> tuple[DWAState, Tensor]:
        w = dwa_weights(state, temperature=temperature)
        return dwa_observe(state, losses), w

    return LossWeighting(init, update, "dwa")
