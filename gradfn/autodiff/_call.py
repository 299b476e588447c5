"""One evaluation of a loss function by the per-task gradient engine: which parameters are
differentiated, the forward with autograd, the strategy ``"auto"`` picks, the task selection."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from gradfn._internal.compat import is_compiling
from gradfn.autodiff._losses import loss_list, split_aux
from gradfn.autodiff._usage import reached_leaves
from gradfn.tree import partition
from gradfn.typing import LossFn, PyTree

__all__ = ["STRATEGIES", "Predicate", "Tasks", "choose_strategy"]

STRATEGIES = ("auto", "vmap", "loop")
Predicate = Callable[[str], bool]
Tasks = Sequence[int] | Tensor | None
_Out = tuple[Tensor, Any, PyTree, Tensor | None]  # losses, aux, task-stacked grads, usage (R, P)


class _Call(NamedTuple):
    """One evaluation of ``loss_fn``: the differentiated parameters, the constant ones, the batch,
    and how to read its output."""

    loss_fn: LossFn
    selected: PyTree
    rest: dict[str, Tensor]
    batch: Any
    has_aux: bool
    num_tasks: int | None

    def losses(self, selected: PyTree, batch: Any = None) -> tuple[Any, Any]:
        """``(raw output, aux)`` of ``loss_fn`` at ``selected`` (and ``batch``, default: the
        call's)."""
        out = self.loss_fn(_merge(selected, self.rest), self.batch if batch is None else batch)
        return split_aux(out, self.has_aux)


# --------------------------------------------------------------------------------------------
# parameters


def _select(params: PyTree, wrt: Predicate | None) -> tuple[PyTree, dict[str, Tensor]]:
    """Split ``params`` into the differentiated part and the part held constant."""
    if wrt is None:
        if isinstance(params, Mapping) and len(params) == 0:
            raise ValueError("params is empty: there is nothing to differentiate")
        _check_leaves(params)
        return params, {}
    if not isinstance(params, Mapping):
        raise TypeError("`wrt` needs `params` to be a mapping of dotted names to tensors")
    if not callable(wrt):
        raise TypeError(f"`wrt` must be a predicate on parameter names, got {type(wrt).__name__}")
    selected, rest = partition(params, wrt)
    if not selected:
        raise ValueError(
            f"`wrt` selects no parameter (names available: {sorted(params)[:8]}"
            f"{'...' if len(params) > 8 else ''})"
        )
    _check_leaves(selected)
    return selected, rest


def _check_leaves(selected: PyTree) -> None:
    """The differentiated leaves must be floating (or complex) tensors: a Python number or an
    integer tensor cannot carry a gradient."""
    leaves = optree.tree_leaves(selected)
    if not leaves:
        raise ValueError("`params` holds no tensor: there is nothing to differentiate")
    for x in leaves:
        if not isinstance(x, Tensor):
            raise TypeError(
                f"`params` must be a pytree of floating-point tensors, got a leaf of type "
                f"{type(x).__name__}"
            )
        if not (x.is_floating_point() or x.is_complex()):
            raise TypeError(f"`params` leaves must be floating-point tensors, got {x.dtype}")


def _merge(selected: PyTree, rest: dict[str, Tensor]) -> PyTree:
    return {**rest, **selected} if rest else selected


def choose_strategy(params: PyTree) -> str:
    """The strategy ``"auto"`` picks for these (selected) parameters; see the module docstring."""
    leaves = optree.tree_leaves(params)
    if is_compiling() or not leaves or leaves[0].device.type != "cpu":
        return "vmap"
    return "loop"


def _task_list(tasks: Tasks, k: int) -> list[int]:
    """The differentiated tasks as a list of indices in ``[0, K)`` (all ``K`` for ``None``)."""
    if tasks is None:
        return list(range(k))
    chosen = tasks.tolist() if isinstance(tasks, Tensor) else list(tasks)
    if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < k for i in chosen):
        raise ValueError(f"`tasks` must hold task indices in [0, {k}), got {chosen!r}")
    return chosen


# --------------------------------------------------------------------------------------------
# one forward with autograd


def _forward(call: _Call) -> tuple[list[Tensor], Any, list[Tensor], Any]:
    """Run ``loss_fn`` once on detached copies of the selected leaves that require grad.

    Returns ``(leaves, treedef, losses, aux)``; call it under ``torch.enable_grad()``.
    """
    flat, spec = optree.tree_flatten(call.selected)
    leaves = [x.detach().requires_grad_(True) for x in flat]
    out, aux = call.losses(optree.tree_unflatten(spec, leaves))
    return leaves, spec, loss_list(out, call.num_tasks), aux


def _usage_of(losses: list[Tensor], leaves: list[Tensor]) -> Tensor:
    """``(R, P)`` bool: does loss ``r`` reach leaf ``p``? (read from the graph)"""
    return torch.tensor(
        [
            reached_leaves(loss, leaves) if loss.requires_grad else [False] * len(leaves)
            for loss in losses
        ],
        dtype=torch.bool,
    ).reshape(len(losses), len(leaves))
