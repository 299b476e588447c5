"""Per-task gradients added into task-stacked buffers in place (gradient accumulation)."""

from __future__ import annotations

from typing import Any

import optree
import torch
from torch import Tensor

from gradfn._internal.checks import check_choice
from gradfn._internal.compat import is_compiling
from gradfn.autodiff._call import STRATEGIES, Predicate, _Call, _forward, _select, choose_strategy
from gradfn.autodiff._engine import _usage_tree, per_task_impl
from gradfn.autodiff._losses import stack_losses
from gradfn.typing import LossFn, PyTree, Strategy

__all__ = ["accumulate_impl", "accumulate_per_task_grads"]


def _add_scaled(acc: Tensor, g: Tensor, scale: float | Tensor) -> None:
    if isinstance(scale, Tensor):
        acc.add_(g * scale)
    else:
        acc.add_(g, alpha=scale)


def _check_into(sel_leaves: list[Tensor], spec: Any, into: PyTree) -> list[Tensor]:
    try:
        into_leaves = spec.flatten_up_to(into)
    except ValueError as err:
        raise ValueError(
            f"`into` must have the structure of the differentiated params: {err}"
        ) from None
    for x, acc in zip(sel_leaves, into_leaves, strict=True):
        if not isinstance(acc, Tensor) or acc.shape[1:] != x.shape or acc.dim() != x.dim() + 1:
            shape = tuple(acc.shape) if isinstance(acc, Tensor) else type(acc).__name__
            raise ValueError(
                f"`into` leaves must have shape (K, *param.shape); got {shape} for a parameter "
                f"of shape {tuple(x.shape)}"
            )
    return into_leaves


def accumulate_per_task_grads(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    into: PyTree,
    *,
    scale: float | Tensor = 1.0,
    wrt: Predicate | None = None,
    strategy: Strategy = "auto",
    task_batched: bool = False,
    has_aux: bool = False,
    num_tasks: int | None = None,
    return_usage: bool = False,
) -> Any:
    """Add ``scale · J`` into the task-stacked buffers ``into``, in place; return the losses.

    The accumulation form of :func:`value_and_per_task_grads`, for gradient accumulation over
    micro-batches: ``into[name][k] += scale · ∂L_k/∂params[name]``. With the ``"loop"`` strategy
    each task's gradient is added straight into its row, so no ``K × n`` stacked copy is made;
    rows of parameters a task does not reach are left untouched. ``into`` has the structure of the
    selected ``params`` with a leading ``K`` axis; its dtype may be wider than the parameters'
    (e.g. float32 accumulators for bfloat16 parameters). Eager only (it mutates ``into``).

    Returns ``losses`` (``(K,)``, detached), or ``(losses, aux)`` with ``has_aux``; with
    ``return_usage`` a pair ``(that, usage)``, usage as in :func:`value_and_per_task_grads`.
    """
    losses, aux, usage = accumulate_impl(
        loss_fn, params, batch, into, scale, wrt, strategy, task_batched, has_aux, num_tasks
    )
    out = (losses, aux) if has_aux else losses
    if not return_usage:
        return out
    return out, _usage_tree(optree.tree_structure(_select(params, wrt)[0]), usage)


def accumulate_impl(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    into: PyTree,
    scale: float | Tensor,
    wrt: Predicate | None,
    strategy: Strategy,
    task_batched: bool,
    has_aux: bool,
    num_tasks: int | None,
) -> tuple[Tensor, Any, Tensor | None]:
    """``(losses, aux, usage (K, P) bool or None)``: the body of
    :func:`accumulate_per_task_grads`."""
    check_choice("strategy", strategy, STRATEGIES)
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}")
    selected, rest = _select(params, wrt)
    sel_leaves, spec = optree.tree_flatten(selected)
    into_leaves = _check_into(sel_leaves, spec, into)
    if strategy == "auto":
        strategy = choose_strategy(selected)  # type: ignore[assignment]
    if strategy != "loop" or task_batched or is_compiling():
        losses, aux, grads, usage = per_task_impl(
            loss_fn, params, batch, wrt, strategy, task_batched, has_aux, num_tasks, None, True
        )
        grad_leaves: list[Any] = spec.flatten_up_to(grads)
        for acc, g in zip(into_leaves, grad_leaves, strict=True):
            if acc.shape[0] != g.shape[0]:
                raise ValueError(
                    f"`into` has a task axis of {acc.shape[0]} but there are {g.shape[0]} tasks"
                )
            with torch.no_grad():
                _add_scaled(acc, g, scale)
        return losses, aux, usage
    with torch.enable_grad():
        leaves, _, loss_values, aux = _forward(
            _Call(loss_fn, selected, rest, batch, has_aux, num_tasks)
        )
        k = len(loss_values)
        if any(acc.shape[0] != k for acc in into_leaves):
            raise ValueError(f"`into` has a task axis that differs from the {k} task losses")
        last = max((i for i, loss in enumerate(loss_values) if loss.requires_grad), default=-1)
        reached = [[False] * len(leaves) for _ in range(k)]
        for i, loss in enumerate(loss_values):
            if not loss.requires_grad:
                continue
            row = torch.autograd.grad(loss, leaves, retain_graph=i < last, allow_unused=True)
            with torch.no_grad():
                for j, (acc, gi) in enumerate(zip(into_leaves, row, strict=True)):
                    if gi is not None:
                        reached[i][j] = True
                        _add_scaled(acc[i], gi, scale)
    usage = torch.tensor(reached, dtype=torch.bool).reshape(k, len(leaves))
    return stack_losses(loss_values).detach(), aux, usage
