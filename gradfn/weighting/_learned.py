"""What the learned weightings share: a ``(K,)`` parameter ``s`` the user's optimizer trains."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradfn.transforms import EmptyState
from gradfn.weighting._base import LossWeighting, check_losses, task_count

__all__ = ["check_params", "learned"]


def check_params(params: Any, k: int, fn: str) -> Tensor:
    """``params`` must be the ``(K,)`` floating tensor made by ``init_params``."""
    if not isinstance(params, Tensor):
        raise TypeError(
            f"{fn}: `params` must be the (K,) tensor from init_params (add it to your "
            f"optimizer), got {type(params).__name__}"
        )
    if params.shape != (k,) or not params.is_floating_point():
        raise ValueError(f"{fn}: `params` must be a floating ({k},) tensor, got {params.shape}")
    return params


def learned(
    name: str,
    weights_fn: Callable[[Tensor], Tensor],
    penalty_fn: Callable[[Tensor], Tensor],
    init_value: float,
) -> LossWeighting:
    """A :class:`LossWeighting` with weights ``weights_fn(s)`` and penalty ``penalty_fn(s)``;
    its state is empty (the parameter lives with the user's optimizer)."""

    def init(tasks: int | Tensor, *, device: torch.device | str | None = None) -> EmptyState:
        task_count(tasks, device)
        return EmptyState()

    def update(state: EmptyState, losses: Tensor, params: Any = None) -> tuple[EmptyState, Tensor]:
        losses = check_losses(losses, None, name)
        s = check_params(params, losses.shape[0], name)
        return state, weights_fn(s)

    def penalty(params: Any) -> Tensor:
        k = params.shape[0] if isinstance(params, Tensor) and params.dim() == 1 else 0
        return penalty_fn(check_params(params, k, name))

    def init_params(
        num_tasks: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        k, device = task_count(num_tasks, device)
        return torch.full((k,), init_value, dtype=dtype, device=device, requires_grad=True)

    return LossWeighting(init, update, name, penalty=penalty, init_params=init_params)
