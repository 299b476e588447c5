"""Using an aggregator from an ``nn.Module`` training loop in one call that writes ``p.grad``
(:func:`backward`), and the 0.1 in-group hooks of SON-GOKU (deprecated: ``songoku`` now takes an
:class:`Aggregator` directly, stateful ones included)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import optree
from torch import Tensor

from gradfn.aggregators._backward import backward
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
