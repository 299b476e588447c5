"""Which parameters a loss reaches, read from its autograd graph (no backward pass)."""

from __future__ import annotations

from torch import Tensor

__all__ = ["reached_leaves"]


def reached_leaves(loss: Tensor, leaves: list[Tensor]) -> list[bool]:
    """For each of ``leaves`` (tensors with ``requires_grad``): does ``loss`` depend on it?

    A walk over ``loss.grad_fn`` and its ``next_functions`` to the ``AccumulateGrad`` nodes of the
    leaves: the same answer as ``autograd.grad(..., allow_unused=True)`` returning ``None``,
    without computing a gradient.
    """
    index = {id(x): i for i, x in enumerate(leaves)}
    hit = [False] * len(leaves)
    root = loss.grad_fn
    if root is None:
        return hit
    seen = {id(root)}
    stack = [root]
    while stack:
        node = stack.pop()
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in index:
            hit[index[id(variable)]] = True
        for nxt, _ in node.next_functions:
            if nxt is not None and id(nxt) not in seen:
                seen.add(id(nxt))
                stack.append(nxt)
    return hit
