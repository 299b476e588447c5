"""What a loss function returns: the ``K`` task losses, checked, and the optional ``aux``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optree
import torch
from torch import Tensor

__all__ = ["loss_list", "scalar_loss", "split_aux", "stack_losses", "task_axis"]


def loss_list(out: Any, num_tasks: int | None) -> list[Tensor]:
    """The task losses returned by ``loss_fn`` as a list of ``K`` 0-d tensors (checked)."""
    if isinstance(out, Tensor):
        if out.dim() != 1:
            raise ValueError(
                "loss_fn must return K scalar losses (a dict, a tuple/list or a 1-D tensor); "
                f"got a tensor of shape {tuple(out.shape)}"
            )
        losses = list(out.unbind(0))
    elif isinstance(out, Mapping):
        losses = list(out.values())
    elif isinstance(out, (tuple, list)):
        losses = list(out)
    else:
        raise TypeError(
            "loss_fn must return a dict of scalar tensors, a tuple/list of scalar tensors or a 1-D "
            f"tensor; got {type(out).__name__}"
        )
    if len(losses) == 0:
        raise ValueError("loss_fn returned an empty set of task losses (K = 0)")
    for i, loss in enumerate(losses):
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss_fn: task loss {i} is a {type(loss).__name__}, not a Tensor")
        if loss.numel() != 1 or loss.dim() > 1:
            raise ValueError(
                f"loss_fn: task loss {i} must be a scalar, got shape {tuple(loss.shape)} "
                "(reduce it, e.g. with .mean())"
            )
    if num_tasks is not None and len(losses) != num_tasks:
        raise ValueError(f"loss_fn returned {len(losses)} task losses but num_tasks={num_tasks}")
    return [loss.reshape(()) for loss in losses]


def stack_losses(losses: list[Tensor]) -> Tensor:
    """``(K,)`` tensor of the losses, in their promoted dtype."""
    dtype = losses[0].dtype
    for loss in losses[1:]:
        dtype = torch.promote_types(dtype, loss.dtype)
    return torch.stack([loss.to(dtype) for loss in losses])


def split_aux(out: Any, has_aux: bool) -> tuple[Any, Any]:
    """``(losses, aux)`` from what ``loss_fn`` returned (``aux`` is None without ``has_aux``)."""
    if not has_aux:
        return out, None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError("has_aux=True needs loss_fn to return a pair (losses, aux)")
    return out


def scalar_loss(out: Any) -> Tensor:
    """The one scalar loss of a per-task batch (``task_batched=True``)."""
    if not isinstance(out, Tensor) or out.numel() != 1:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"task_batched=True: loss_fn must return one scalar loss, got {shape}")
    return out.reshape(())


def task_axis(batch: Any) -> int:
    """The leading task axis ``K`` shared by every tensor of a task-batched ``batch``."""
    leaves = optree.tree_leaves(batch)
    if not leaves:
        raise ValueError("task_batched=True needs `batch` to hold tensors stacked on a task axis")
    sizes = {x.shape[0] if isinstance(x, Tensor) and x.dim() > 0 else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "task_batched=True: every tensor of `batch` needs the same leading task axis K; got "
            f"leading sizes {sorted(str(s) for s in sizes)}"
        )
    k = sizes.pop()
    if k == 0:
        raise ValueError("task_batched=True: `batch` has an empty task axis (K = 0)")
    return int(k)  # type: ignore[arg-type]
