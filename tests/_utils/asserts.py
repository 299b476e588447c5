"""Comparing pytrees of tensors (states, gradients, checkpoints) in tests."""

from __future__ import annotations

from typing import Any

import optree
import torch

__all__ = [
    "assert_trees_close",
    "assert_trees_equal",
    "clone_tree",
    "leaves_equal",
    "tree_equal",
]


def tree_equal(a: Any, b: Any) -> bool:
    """Same structure (dicts, lists, tuples, NamedTuples), same dtypes and shapes, bit-identical
    tensors (NaN equals NaN: ``τ`` is NaN before any refresh); other leaves compared with ``==``."""
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        if a.is_floating_point():
            return bool(((a == b) | (a.isnan() & b.isnan())).all())
        return torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(tree_equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return (
            isinstance(b, (list, tuple))
            and len(a) == len(b)
            and all(tree_equal(x, y) for x, y in zip(a, b, strict=True))
        )
    return a == b


def clone_tree(a: Any) -> Any:
    """A copy of ``a`` with every tensor leaf cloned."""
    return optree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, a)


def leaves_equal(a: Any, b: Any) -> bool:
    """The tensor leaves of ``a`` and ``b`` are equal one by one (``torch.equal``)."""
    la, lb = optree.tree_leaves(a), optree.tree_leaves(b)
    return len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb, strict=True))


def _flatten_pair(a: Any, b: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    la, sa = optree.tree_flatten(a, none_is_leaf=True)
    lb, sb = optree.tree_flatten(b, none_is_leaf=True)
    assert sa == sb, (sa, sb)
    return list(zip(la, lb, strict=True))


def assert_trees_close(a: Any, b: Any, tol: float, *, f64_tol: float | None = None) -> None:
    """Same structure; floating leaves close to ``tol`` (relative and absolute; ``f64_tol`` for
    float64 leaves when given), NaN equal to NaN; other leaves equal."""
    for x, y in _flatten_pair(a, b):
        if x.is_floating_point():
            t = f64_tol if f64_tol is not None and x.dtype == torch.float64 else tol
            torch.testing.assert_close(x, y, rtol=t, atol=t, equal_nan=True)
        else:
            assert torch.equal(x, y), (x, y)


def assert_trees_equal(a: Any, b: Any) -> None:
    """Same structure and bit-identical leaves (NaN equal to NaN)."""
    for x, y in _flatten_pair(a, b):
        assert torch.equal(x, y) or (
            x.is_floating_point()
            and torch.equal(x.isnan(), y.isnan())
            and torch.equal(x.nan_to_num(), y.nan_to_num())
        ), (x, y)
