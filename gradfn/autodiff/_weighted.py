"""The gradient of ``Σ_k w_k L_k`` in one forward and one backward."""

from __future__ import annotations

from typing import Any

import optree
import torch
from torch import Tensor

from gradfn._internal.compat import is_compiling
from gradfn.autodiff._call import Predicate, _merge, _select
from gradfn.autodiff._losses import loss_list, split_aux, stack_losses
from gradfn.typing import LossFn, PyTree

__all__ = ["value_and_weighted_grad", "weighted_impl"]


def value_and_weighted_grad(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    weights: Tensor,
    *,
    wrt: Predicate | None = None,
    has_aux: bool = False,
    num_tasks: int | None = None,
    return_usage: bool = False,
) -> Any:
    """Task losses and the gradient of ``Σ_k w_k L_k`` from ONE forward and ONE backward.

    ``weights`` has shape ``(K,)`` (a 0/1 mask selects a group of tasks). Returns ``(losses (K,),
    grads)`` where ``grads`` has the structure of the selected ``params`` (no task axis); with
    ``has_aux``: ``((losses, aux), grads)``; with ``return_usage`` a third element, a pytree of
    0-d bools: which parameters ``Σ_k w_k L_k`` reaches (``None`` while compiling). Parameters it
    does not reach get zeros. Traces under ``torch.compile``. Eagerly, losses of weight 0 that
    ``loss_fn`` returns as separate tensors (a list, tuple or dict) are left out of the backward,
    so a NaN there cannot reach the gradient (as ``0 × NaN``); one stacked tensor is one graph.
    """
    losses, aux, grads, reached = weighted_impl(
        loss_fn, params, batch, weights, wrt, has_aux, num_tasks
    )
    value = (losses, aux) if has_aux else losses
    if not return_usage:
        return value, grads
    spec = optree.tree_structure(_select(params, wrt)[0])
    usage = None if reached is None else optree.tree_unflatten(spec, list(reached.unbind(0)))
    return value, grads, usage


def weighted_impl(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    weights: Tensor,
    wrt: Predicate | None,
    has_aux: bool,
    num_tasks: int | None,
) -> tuple[Tensor, Any, PyTree, Tensor | None]:
    """``(losses, aux, grads, reached (P,) bool or None)``: the body of
    :func:`value_and_weighted_grad`."""
    if not isinstance(weights, Tensor) or weights.dim() != 1:
        raise ValueError("weights must be a 1-D tensor (K,)")
    selected, rest = _select(params, wrt)

    def weighted(sel: PyTree, keep: list[int] | None = None) -> tuple[Tensor, tuple[Tensor, Any]]:
        out, aux = split_aux(loss_fn(_merge(sel, rest), batch), has_aux)
        parts = loss_list(out, num_tasks)
        losses = stack_losses(parts)
        if losses.shape[0] != weights.shape[0]:
            raise ValueError(
                f"weights has {weights.shape[0]} entries but loss_fn returned "
                f"{losses.shape[0]} losses"
            )
        if keep is None or len(keep) == len(parts):
            return (weights.to(losses.dtype) * losses).sum(), (losses.detach(), aux)
        # losses of weight 0 stay out of the graph: their NaN would reach the gradient as 0 × NaN
        # (given as separate tensors; a stacked 1-D tensor shares one graph)
        if not keep:
            return torch.zeros((), dtype=losses.dtype, device=losses.device), (losses.detach(), aux)
        sub = stack_losses([parts[i] for i in keep]).to(losses.dtype)
        w = weights.index_select(0, torch.tensor(keep, device=weights.device))
        return (w.to(losses.dtype) * sub).sum(), (losses.detach(), aux)

    reached: Tensor | None = None
    if is_compiling():

        def weighted_func(sel: PyTree) -> tuple[Tensor, Any]:
            total, (losses, aux) = weighted(sel)
            return total, ((losses, aux) if has_aux else losses)

        grads, out = torch.func.grad(weighted_func, has_aux=True)(selected)
        losses, aux = out if has_aux else (out, None)
    else:
        flat, spec = optree.tree_flatten(selected)
        leaves = [x.detach().requires_grad_(True) for x in flat]
        keep = [i for i, w in enumerate(weights.tolist()) if w != 0]
        with torch.enable_grad():
            total, (losses, aux) = weighted(optree.tree_unflatten(spec, leaves), keep)
            g = (
                torch.autograd.grad(total, leaves, allow_unused=True)
                if total.requires_grad
                else (None,) * len(leaves)
            )
        grads = optree.tree_unflatten(
            spec,
            [torch.zeros_like(x) if gi is None else gi for gi, x in zip(g, leaves, strict=True)],
        )
        reached = torch.tensor([gi is not None for gi in g], dtype=torch.bool)
    return losses, aux, grads, reached
