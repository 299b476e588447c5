"""Pytree helpers over optree (layer 1 of gradfn).

A *pytree* here is any nesting of dicts / lists / tuples / NamedTuples whose leaves are tensors; the
usual one is ``dict[str, Tensor]`` keyed by dotted parameter names (``model.named_parameters()``).
A *task-stacked* pytree has the structure of ``params`` and a leading axis of size ``K`` on every
leaf: ``grads[name].shape == (K, *params[name].shape)``.

Every function is pure and tensor-only (no host syncs), so it traces under ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optree
import torch
from torch import Tensor

from gradfn.typing import PyTree

__all__ = [
    "PyTree",
    "combine",
    "gram_dtype",
    "gramian",
    "leaves",
    "num_tasks",
    "partition",
    "stack",
    "tree_add",
    "tree_any_nonfinite",
    "tree_cast",
    "tree_dot",
    "tree_map",
    "tree_norm",
    "tree_paths",
    "tree_scale",
    "tree_sq_norm",
    "tree_sub",
    "tree_where",
    "tree_zeros_like",
    "unstack",
    "weighted_sum",
]


def tree_map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """``optree.tree_map``: ``fn`` applied leaf by leaf to ``tree`` and ``rest`` (same structure)."""
    return optree.tree_map(fn, tree, *rest)


def tree_paths(tree: PyTree) -> list[tuple[Any, ...]]:
    """The path of every leaf, in optree's canonical order (dict keys sorted)."""
    return optree.tree_paths(tree)


def leaves(tree: PyTree) -> list[Tensor]:
    """The leaves of ``tree`` in optree's canonical order (``None`` leaves are dropped)."""
    return optree.tree_leaves(tree)


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stack ``K`` pytrees of equal structure along a new leading task axis.

    ``stack([g_1, ..., g_K])[name].shape == (K, *g_k[name].shape)``.
    """
    if len(trees) == 0:
        raise ValueError("stack: `trees` must hold at least one pytree")
    return optree.tree_map(lambda *xs: torch.stack(xs, dim=0), trees[0], *trees[1:])


def unstack(stacked: PyTree) -> list[PyTree]:
    """Inverse of :func:`stack`: split a task-stacked pytree into ``K`` pytrees."""
    k = num_tasks(stacked)
    return [optree.tree_map(lambda x, i=i: x[i], stacked) for i in range(k)]


def num_tasks(stacked: PyTree) -> int:
    """The size ``K`` of the leading task axis of a task-stacked pytree (checked consistent)."""
    ls = leaves(stacked)
    if not ls:
        raise ValueError("num_tasks: the task-stacked pytree has no leaves")
    k = ls[0].shape[0] if ls[0].dim() > 0 else None
    for leaf in ls:
        if leaf.dim() == 0 or leaf.shape[0] != k:
            raise ValueError(
                "num_tasks: every leaf of a task-stacked pytree needs the same leading axis K; "
                f"got shapes {[tuple(x.shape) for x in ls]}"
            )
    return int(k)  # type: ignore[arg-type]


def tree_zeros_like(tree: PyTree, dtype: torch.dtype | None = None) -> PyTree:
    """Zeros with the structure, shapes and devices of ``tree`` (optionally another dtype)."""
    return optree.tree_map(lambda x: torch.zeros_like(x, dtype=dtype), tree)


def tree_cast(tree: PyTree, dtype: torch.dtype) -> PyTree:
    """Every leaf converted to ``dtype``."""
    return optree.tree_map(lambda x: x.to(dtype), tree)


def tree_add(a: PyTree, b: PyTree) -> PyTree:
    """Leafwise ``a + b``."""
    return optree.tree_map(torch.add, a, b)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    """Leafwise ``a - b``."""
    return optree.tree_map(torch.sub, a, b)


def tree_scale(tree: PyTree, scale: Tensor | float) -> PyTree:
    """Leafwise ``scale * x`` (``scale`` a Python number or a 0-d tensor)."""
    return optree.tree_map(lambda x: x * scale, tree)


def tree_where(cond: Tensor, a: PyTree, b: PyTree) -> PyTree:
    """Leafwise ``torch.where(cond, a, b)`` with a 0-d boolean ``cond`` (no host sync)."""
    return optree.tree_map(lambda x, y: torch.where(cond, x, y), a, b)


def tree_dot(a: PyTree, b: PyTree, dtype: torch.dtype = torch.float32) -> Tensor:
    """``<a, b>`` summed over all leaves, accumulated in ``dtype``; a 0-d tensor."""
    terms = [
        torch.sum(x.to(dtype) * y.to(dtype)) for x, y in zip(leaves(a), leaves(b), strict=True)
    ]
    if not terms:
        raise ValueError("tree_dot: the pytrees have no leaves")
    return torch.stack(terms).sum()


def tree_sq_norm(tree: PyTree, dtype: torch.dtype = torch.float32) -> Tensor:
    """``||tree||²`` over all leaves, accumulated in ``dtype``; a 0-d tensor."""
    return tree_dot(tree, tree, dtype)


def tree_norm(tree: PyTree, dtype: torch.dtype = torch.float32) -> Tensor:
    """Global L2 norm ``||tree||`` over all leaves; a 0-d tensor."""
    return torch.sqrt(tree_sq_norm(tree, dtype))


def tree_any_nonfinite(tree: PyTree) -> Tensor:
    """0-d boolean tensor: does any leaf hold a NaN or an infinity? (no host sync)

    One fused multi-tensor 2-norm over the leaves (``torch._foreach_norm``, as
    ``torch.nn.utils.clip_grad_norm_`` fuses its norms): a NaN or an infinity makes it non-finite.
    So does an entry so large that its square overflows (``|x| ≳ 1.8e19`` in float32): such a
    gradient is as unusable, and the exact test costs an unfused pass per leaf.
    """
    ls = leaves(tree)
    if not ls:
        return torch.tensor(False)
    norms = torch._foreach_norm(ls)
    return ~torch.isfinite(torch.stack([n.to(torch.float32) for n in norms]).sum())


def _rows(leaf: Tensor, k: int) -> Tensor:
    return leaf.reshape(k, -1)


def gram_dtype(stacked: PyTree) -> torch.dtype:
    """The Gramian's accumulation dtype: float64 when any leaf is float64, else float32."""
    wide = any(x.dtype == torch.float64 for x in leaves(stacked))
    return torch.float64 if wide else torch.float32


def gramian(stacked: PyTree, dtype: torch.dtype | None = torch.float32) -> Tensor:
    """Gramian ``G = J Jᵀ`` (``K×K``, in ``dtype``) of a task-stacked pytree.

    ``G_ij = <g_i, g_j>`` summed leaf by leaf (``Σ_leaf l.reshape(K,-1) @ l.reshape(K,-1)ᵀ``),
    never concatenating the parameters. ``dtype=None`` picks :func:`gram_dtype`.
    """
    ls = leaves(stacked)
    k = num_tasks(stacked)
    dtype = gram_dtype(stacked) if dtype is None else dtype
    g = torch.zeros(k, k, dtype=dtype, device=ls[0].device)
    for leaf in ls:
        rows = _rows(leaf, k).to(dtype)
        g = g + rows @ rows.T
    return g


def weighted_sum(stacked: PyTree, weights: Tensor) -> PyTree:
    """``Σ_k w_k g_k`` over the task axis: a pytree with the structure of one task's gradients.

    ``weights`` has shape ``(K,)``. The contraction runs in the leaf's dtype (weights are cast).
    """
    if weights.dim() != 1:
        raise ValueError(
            f"weighted_sum: `weights` must be 1-D (K,), got shape {tuple(weights.shape)}"
        )

    def one(leaf: Tensor) -> Tensor:
        k = leaf.shape[0]
        if k != weights.shape[0]:
            raise ValueError(
                f"weighted_sum: `weights` has {weights.shape[0]} entries but the task axis is {k}"
            )
        w = weights.to(dtype=leaf.dtype, device=leaf.device)
        return (w @ _rows(leaf, k)).reshape(leaf.shape[1:])

    return optree.tree_map(one, stacked)


def combine(coefficients: Tensor, stacked: PyTree) -> PyTree:
    """Linear recombination on the task axis: ``out_i = Σ_j C_ij g_j``.

    ``coefficients`` is ``(M, K)``; the result is task-stacked with leading axis ``M``.
    """
    if coefficients.dim() != 2:
        raise ValueError(
            f"combine: `coefficients` must be 2-D (M, K), got shape {tuple(coefficients.shape)}"
        )

    def one(leaf: Tensor) -> Tensor:
        k = leaf.shape[0]
        c = coefficients.to(dtype=leaf.dtype, device=leaf.device)
        return (c @ _rows(leaf, k)).reshape((c.shape[0], *leaf.shape[1:]))

    return optree.tree_map(one, stacked)


def partition(
    params: Mapping[str, Tensor], predicate: Callable[[str], bool]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a name → tensor mapping by ``predicate(dotted_name)``: ``(selected, rest)``.

    Order of insertion is kept in both parts.
    """
    if not callable(predicate):
        raise TypeError(f"partition: `predicate` must be callable, got {type(predicate).__name__}")
    selected: dict[str, Tensor] = {}
    rest: dict[str, Tensor] = {}
    for name, value in params.items():
        (selected if predicate(name) else rest)[name] = value
    return selected, rest
