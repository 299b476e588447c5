"""Using an aggregator from an ``nn.Module`` training loop in one call that writes ``p.grad``
(:func:`backward`), and the 0.1 in-group hooks of SON-GOKU (deprecated: ``songoku`` now takes an
:class:`Aggregator` directly, stateful ones included)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import optree
import torch
from torch import Tensor, nn

from gradfn.aggregators._base import Aggregated, Aggregator, check_grads
from gradfn.aggregators._registry import aggregator as _build
from gradfn.typing import PyTree

__all__ = [
    "as_aggregator",
    "as_gradient_transform",
    "as_stateful_gradient_transform",
    "backward",
    "per_task_rows",
]


def as_aggregator(
    agg: Aggregator | str | Callable[..., Aggregated], hparams: dict | None = None
) -> Aggregator:
    """An :class:`Aggregator` from an aggregator, a method name or a pure aggregate function."""
    return _resolve(agg, hparams or {})


def _resolve(agg: Aggregator | str | Callable[..., Aggregated], hparams: dict) -> Aggregator:
    if isinstance(agg, Aggregator):
        if hparams:
            raise TypeError("hyper-parameters go to `aggregator(...)`, not to an Aggregator")
        return agg
    return _build(agg, **hparams)


def per_task_rows(out: Aggregated, grads: PyTree) -> PyTree:
    """Task-stacked contributions whose sum over the task axis is ``out.grad``: ``w_k g_k``
    (or ``out.rows`` for methods that are not a weighting)."""
    if out.rows is not None:
        return out.rows

    def scale(x: Tensor) -> Tensor:
        w = out.weights.to(device=x.device, dtype=x.dtype)
        return w.reshape((-1,) + (1,) * (x.dim() - 1)) * x

    return optree.tree_map(scale, grads)


def as_gradient_transform(
    agg: Aggregator | str | Callable[..., Aggregated], **hparams: Any
) -> Callable[..., PyTree]:
    """Deprecated: pass the aggregator to ``songoku(..., aggregator=...)`` instead.

    A stateless in-group hook ``transform(grads, active=None) -> rows``.

    ``grads`` task-stacked (``K`` rows), ``active`` a ``(K,)`` bool mask. Row ``k`` of the output
    is ``w_k g_k`` for active ``k`` and 0 otherwise, so the rows sum to the method's aggregate
    over the active tasks. For stateful or randomised methods (GradVac, Nash-MTL, PCGrad,
    GradDrop) use :func:`as_stateful_gradient_transform`, which threads their state.
    """
    warnings.warn(
        "as_gradient_transform is deprecated: pass the aggregator to songoku(aggregator=...)",
        DeprecationWarning,
        stacklevel=2,
    )
    a = _resolve(agg, hparams)
    if a.stateful:
        raise TypeError(
            f"as_gradient_transform: {a.name!r} keeps state between calls; "
            "use as_stateful_gradient_transform"
        )

    def transform(grads: PyTree, active: Tensor | None = None) -> PyTree:
        k = check_grads(grads, "gradient_transform")
        _, out = a.update(a.init(k), grads, active=active)
        return per_task_rows(out, grads)

    return transform


def as_stateful_gradient_transform(
    agg: Aggregator | str | Callable[..., Aggregated], **hparams: Any
) -> tuple[Callable[..., Any], Callable[..., tuple[Any, PyTree]]]:
    """Deprecated: pass the aggregator to ``songoku(..., aggregator=...)`` instead.

    ``(init, transform)``: ``init(num_tasks) -> state`` and
    ``transform(state, grads, active=None) -> (state, rows)`` (rows as in
    :func:`as_gradient_transform`)."""
    warnings.warn(
        "as_stateful_gradient_transform is deprecated: pass the aggregator to "
        "songoku(aggregator=...), which keeps its state in the SON-GOKU state",
        DeprecationWarning,
        stacklevel=2,
    )
    a = _resolve(agg, hparams)

    def transform(state: Any, grads: PyTree, active: Tensor | None = None) -> tuple[Any, PyTree]:
        check_grads(grads, "gradient_transform")
        state, out = a.update(state, grads, active=active)
        return state, per_task_rows(out, grads)

    return a.init, transform


def _named_params(params: nn.Module | Mapping[str, Tensor] | Iterable[Tensor]) -> dict[str, Tensor]:
    named: dict[str, Tensor]
    if isinstance(params, nn.Module):
        named = {n: p for n, p in params.named_parameters() if p.requires_grad}
    elif isinstance(params, Mapping):
        named = {str(n): p for n, p in params.items() if p.requires_grad}
    else:
        named = {str(i): p for i, p in enumerate(params) if p.requires_grad}
    if not named:
        raise ValueError("backward: `params` holds no tensor that requires grad")
    return named


def _per_task_grads(
    loss: Tensor, names: list[str], tensors: list[Tensor], parallel: bool
) -> tuple[dict[str, Tensor], set[str]]:
    k = loss.shape[0]
    eye = torch.eye(k, dtype=loss.dtype, device=loss.device)
    grads: Sequence[Tensor | None] | None = None
    if parallel:
        try:
            grads = torch.autograd.grad(
                loss,
                tensors,
                grad_outputs=eye,
                is_grads_batched=True,
                retain_graph=True,
                allow_unused=True,
            )
            # (the graph is kept so that the loop fallback can still run)
        except RuntimeError:  # an op without a batching rule: fall back to the loop
            grads = None
    if grads is None:
        rows = [
            torch.autograd.grad(loss[i], tensors, retain_graph=True, allow_unused=True)
            for i in range(k)
        ]
        grads = [
            None
            if all(r[j] is None for r in rows)
            else torch.stack([torch.zeros_like(tensors[j]) if r[j] is None else r[j] for r in rows])
            for j in range(len(tensors))
        ]
    out, unused = {}, set()
    for n, t, g in zip(names, tensors, grads, strict=True):
        if g is None:
            unused.add(n)
            g = torch.zeros((k, *t.shape), dtype=t.dtype, device=t.device)
        out[n] = g
    return out, unused


def backward(
    losses: Sequence[Tensor] | Tensor,
    params: nn.Module | Mapping[str, Tensor] | Iterable[Tensor],
    agg: Aggregator | str | Callable[..., Aggregated],
    *,
    state: Any = None,
    parallel: bool = True,
    **hparams: Any,
) -> tuple[Any, Aggregated]:
    """Per-task gradients of ``losses`` w.r.t. ``params``, aggregated, accumulated into ``.grad``.

    Args:
        losses: ``K`` scalar losses from one forward (a sequence or a ``(K,)`` tensor).
        params: an ``nn.Module`` (its trainable parameters), a name → tensor mapping or an
            iterable of tensors.
        agg: an :class:`Aggregator`, a method name (with ``**hparams``) or a pure aggregate fn.
        state: the aggregator's state from the previous call (``None``: ``agg.init(K)``).
        parallel: one batched backward over the ``K`` losses (vmap over autograd); falls back to
            ``K`` backward passes when an op has no batching rule. ``False``: the loop.

    Returns:
        ``(state, Aggregated)``; ``Aggregated.grad`` is keyed like ``params`` (dotted names for a
        module). Parameters no loss depends on keep their ``.grad``.

    Raises:
        ValueError: a non-finite loss or gradient (nothing is written to ``.grad``).
    """
    a = _resolve(agg, hparams)
    if isinstance(losses, Tensor):
        loss = losses.reshape(-1)
    else:
        if len(losses) == 0:
            raise ValueError("backward: `losses` is empty")
        loss = torch.stack([torch.as_tensor(x).reshape(()) for x in losses])
    if loss.numel() == 0:
        raise ValueError("backward: `losses` is empty")
    if not bool(torch.isfinite(loss.detach()).all()):
        raise ValueError(f"backward: non-finite loss in {loss.detach().tolist()}")
    named = _named_params(params)
    names, tensors = list(named), list(named.values())
    grads, unused = _per_task_grads(loss, names, tensors, parallel)
    bad = [n for n, g in grads.items() if not bool(torch.isfinite(g).all())]
    if bad:
        raise ValueError(f"backward: non-finite per-task gradient for {bad}")
    if state is None:
        state = a.init(loss.shape[0], device=loss.device)
    state, out = a.update(state, grads)
    with torch.no_grad():
        for n, p in named.items():
            if n in unused:
                continue
            g = out.grad[n].to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)
    return state, out
