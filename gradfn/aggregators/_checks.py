"""Input checks of the aggregators: shapes and dtypes only, no host syncs."""

from __future__ import annotations

import optree
import torch
from torch import Tensor

from gradfn import tree
from gradfn.typing import PyTree

__all__ = [
    "check_active",
    "check_grads",
    "check_gram",
    "check_gram_of",
    "check_pref",
    "reject_per_task_sequence",
    "single_leaf",
]


def single_leaf(grads: PyTree) -> Tensor | None:
    """The tensor when ``grads`` is a plain one-entry dict of a tensor (or a tensor), else None:
    the common case, handled without flattening the pytree."""
    if type(grads) is dict and len(grads) == 1:
        (x,) = grads.values()
        return x if isinstance(x, Tensor) else None
    return grads if isinstance(grads, Tensor) else None


def reject_per_task_sequence(grads: PyTree, fn: str) -> None:
    """Raise on a top-level list or tuple of two or more alike entries (tensors of one shape, or
    pytrees of one structure and leaf shapes): ``[g_1, ..., g_K]`` (``K`` task gradients) and a
    task-stacked pytree with those leaves read differently, so neither meaning is guessed.

    Only a plain ``list``/``tuple`` is checked (a NamedTuple or a dict names its entries), and only
    the structure and shapes are read: no host syncs.
    """
    if type(grads) not in (list, tuple) or len(grads) < 2:
        return
    first = grads[0]
    if isinstance(first, Tensor):
        if not all(isinstance(g, Tensor) and g.shape == first.shape for g in grads):
            return
        stacked_k = first.shape[0] if first.dim() > 0 else None
    else:
        spec = optree.tree_structure(first)
        if spec.num_leaves == 0:
            return
        shapes = [tuple(x.shape) for x in optree.tree_leaves(first)]
        for g in grads[1:]:
            if optree.tree_structure(g) != spec:
                return
            if [tuple(x.shape) for x in optree.tree_leaves(g)] != shapes:
                return
        stacked_k = shapes[0][0] if shapes[0] else None
    kind = type(grads).__name__
    as_tree = (
        f"as a task-stacked pytree with K = {stacked_k} (each entry one parameter)"
        if stacked_k is not None
        else "as a pytree of 0-d leaves (no task axis)"
    )
    raise ValueError(
        f"{fn}: `grads` is a {kind} of {len(grads)} alike entries, which is ambiguous: it reads "
        f"as {len(grads)} task gradients or {as_tree}. "
        "Pass K task gradients task-stacked: `torch.stack(grads)` for tensors, "
        "`gradfn.tree.stack(grads)` for pytrees, or a dict of task-stacked leaves "
        "({'w': w_stacked, 'b': b_stacked}) for one task-stacked pytree."
    )


def check_grads(grads: PyTree, fn: str) -> int:
    """Validate a task-stacked pytree of floating tensors; return ``K``.

    A top-level list or tuple of alike entries is rejected (:func:`reject_per_task_sequence`).
    """
    x = single_leaf(grads)
    if x is not None and x.is_floating_point() and x.dim() > 0 and x.shape[0] > 0:
        return x.shape[0]
    reject_per_task_sequence(grads, fn)
    ls = tree.leaves(grads)
    if not ls:
        raise ValueError(f"{fn}: `grads` must be a task-stacked pytree with at least one tensor")
    for leaf in ls:
        if not isinstance(leaf, Tensor) or not leaf.is_floating_point():
            kind = leaf.dtype if isinstance(leaf, Tensor) else type(leaf).__name__
            raise TypeError(f"{fn}: `grads` leaves must be floating-point tensors, got {kind}")
    try:
        k = tree.num_tasks(grads)
    except ValueError as e:
        raise ValueError(f"{fn}: `grads` {e}") from None
    if k == 0:
        raise ValueError(f"{fn}: `grads` has an empty task axis (K = 0)")
    return k


def check_gram(gram: Tensor, fn: str) -> int:
    """Validate a ``K×K`` floating Gramian; return ``K``."""
    if not isinstance(gram, Tensor):
        raise TypeError(f"{fn}: `gram` must be a tensor, got {type(gram).__name__}")
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(f"{fn}: `gram` must be a non-empty K×K matrix, got {tuple(gram.shape)}")
    if not gram.is_floating_point():
        raise TypeError(f"{fn}: `gram` must be floating-point, got {gram.dtype}")
    return gram.shape[0]


def check_gram_of(gram: Tensor, k: int, fn: str) -> None:
    """A precomputed Gramian passed with ``K`` task gradients: a floating ``(K, K)`` tensor."""
    if not isinstance(gram, Tensor):
        raise TypeError(
            f"{fn}: `gram` must be a ({k}, {k}) tensor (the Gramian of the {k} task gradients), "
            f"got {type(gram).__name__}"
        )
    if tuple(gram.shape) != (k, k):
        raise ValueError(
            f"{fn}: `gram` must have shape ({k}, {k}) for the {k} task gradients, got "
            f"{tuple(gram.shape)}"
        )
    check_gram(gram, fn)


def check_active(active: Tensor | None, k: int, fn: str) -> None:
    if active is None:
        return
    if not isinstance(active, Tensor) or active.dtype != torch.bool or active.shape != (k,):
        got = (active.dtype, tuple(active.shape)) if isinstance(active, Tensor) else type(active)
        raise ValueError(f"{fn}: `active` must be a ({k},) bool tensor, got {got}")


def check_pref(pref: Tensor | None, k: int, fn: str) -> None:
    if pref is None:
        return
    if not isinstance(pref, Tensor) or pref.shape != (k,):
        got = tuple(pref.shape) if isinstance(pref, Tensor) else type(pref).__name__
        raise ValueError(f"{fn}: `pref` must be a ({k},) tensor, got {got}")
