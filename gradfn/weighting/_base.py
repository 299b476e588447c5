"""The loss-weighting protocol: a pure ``(init, update)`` pair over the ``K`` task losses.

* ``init(tasks, *, device=None) -> state`` (``tasks``: ``K`` or a ``(K,)`` loss tensor)
* ``update(state, losses, params=None) -> (state, weights)``, ``losses`` and ``weights`` ``(K,)``

State first, as every gradfn transform; states are NamedTuples of tensors (``torch.save``-able,
compared leaf by leaf, carried through ``torch.compile(fullgraph=True)``). The step's loss is
``Σ_k w_k L_k``: one backward pass, whatever ``K``. Two kinds of method:

* **weights from loss values** (DWA, RLW, FAMO, GradNorm): ``weights`` carry no graph; a
  non-finite loss leaves the state unchanged.
* **learned weights** (uncertainty weighting, IMTL-L): the weights are a function of a ``(K,)``
  parameter ``s`` that the user's optimizer trains. ``init_params(K)`` makes it (add it to the
  optimizer), ``update(state, losses, s)`` returns weights attached to ``s`` and the step's loss
  is ``Σ_k w_k L_k + penalty(s)`` (:func:`weighted_loss` builds it).
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradfn.typing import State

__all__ = ["LossWeighting", "check_losses", "task_count", "weighted_loss"]


class LossWeighting(NamedTuple):
    """``init(tasks, *, device=None) -> state``; ``update(state, losses, params=None) -> (state,
    weights)``. ``penalty(params) -> scalar`` and ``init_params(K, *, device=None) -> (K,)``
    are set for learned weightings (module docstring), ``None`` otherwise."""

    init: Callable[..., State]
    update: Callable[..., tuple[State, Tensor]]
    name: str = "weighting"
    penalty: Callable[[Tensor], Tensor] | None = None
    init_params: Callable[..., Tensor] | None = None


def task_count(
    tasks: int | Tensor, device: torch.device | str | None = None
) -> tuple[int, torch.device | str | None]:
    """``(K, device)`` from ``K`` or a ``(K,)`` loss tensor."""
    if isinstance(tasks, bool) or not isinstance(tasks, (numbers.Integral, Tensor)):
        raise TypeError(f"weighting init: `tasks` must be K or a (K,) tensor, got {type(tasks)}")
    if not isinstance(tasks, Tensor):
        tasks = operator.index(tasks)  # a numpy integer as an int
        if tasks <= 0:
            raise ValueError(f"weighting init: the number of tasks must be positive, got {tasks}")
        return tasks, device
    if tasks.dim() != 1 or tasks.numel() == 0:
        raise ValueError(f"weighting init: `tasks` must be a (K,) tensor, got {tuple(tasks.shape)}")
    return tasks.numel(), tasks.device if device is None else device


def check_losses(losses: Tensor | Sequence[Tensor], k: int | None, fn: str) -> Tensor:
    """``losses`` as a floating ``(K,)`` tensor (a sequence of scalars is stacked)."""
    if not isinstance(losses, Tensor):
        if not isinstance(losses, (list, tuple)) or not all(
            isinstance(x, Tensor) and x.numel() == 1 for x in losses
        ):
            raise TypeError(f"{fn}: `losses` must be a (K,) tensor or a sequence of scalars")
        losses = torch.stack([x.reshape(()) for x in losses])
    if losses.dim() != 1 or not losses.is_floating_point():
        raise ValueError(
            f"{fn}: `losses` must be a floating (K,) tensor, got {losses.dtype} "
            f"{tuple(losses.shape)}"
        )
    if k is not None and losses.shape[0] != k:
        raise ValueError(f"{fn}: `losses` has {losses.shape[0]} tasks, the state {k}")
    return losses


def weighted_loss(
    weighting: LossWeighting,
    state: State,
    losses: Tensor | Sequence[Tensor],
    params: Any = None,
) -> tuple[State, Tensor, Tensor]:
    """``(state, loss, weights)``: the step's scalar loss ``Σ_k w_k L_k`` (plus ``penalty(params)``
    for a learned weighting), to backpropagate once. ``losses``: a ``(K,)`` tensor or a sequence
    of ``K`` scalars (what GradNorm prefers), with their graph."""
    if not isinstance(weighting, LossWeighting):
        raise TypeError(f"weighted_loss: `weighting` must be a LossWeighting, got {weighting!r}")
    stacked = check_losses(losses, None, "weighted_loss")
    # a sequence goes to `update` as it is: GradNorm differentiates each task's own loss
    state, w = weighting.update(state, losses, params)
    total = (w.to(stacked.dtype) * stacked).sum()
    if weighting.penalty is not None:
        total = total + weighting.penalty(params)
    return state, total, w
