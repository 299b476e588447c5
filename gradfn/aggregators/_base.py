"""The calling protocol shared by every aggregator.

Two layers:

* **Pure functions.** ``xxx_weights(gram, ...) -> w`` maps the Gramian ``G = J Jᵀ`` (``K×K``)
  to task weights ``w`` (``K,``); ``xxx(grads, ...) -> Aggregated(grad, weights)`` takes the
  task-stacked gradients, computes ``w`` from their Gramian and returns ``Σ_k w_k g_k``
  (Gramian first: only ``K×K`` work besides the Gramian and the final weighted sum).
* **Aggregator**: the gradient-transform protocol of :mod:`gradfn.transforms` over task-stacked
  input. ``init(tasks) -> state`` (``tasks``: a task-stacked pytree, or the number of tasks ``K``)
  and ``update(state, grads, params=None, *, active=None, gram=None) -> (state, Aggregated)``:
  one shape for stateless methods (an empty state), random ones (a counter that seeds the next
  draw) and stateful ones (GradVac, Nash-MTL). Where the method is a weighting of the Gramian,
  ``weighting(state, gram, *, active=None) -> (state, w)`` gives the weights from a ``K×K``
  Gramian alone (what SON-GOKU and GCond use: no ``K × n`` work). Build one with
  :func:`gradfn.aggregators.aggregator`.

Every weighting takes an optional ``active`` (``K,`` bool) mask: inactive tasks are ignored (as if
their rows were absent) and get weight 0.

Non-finite input: if the Gramian holds a NaN or an infinity (any non-finite gradient entry, or
a gradient so large that its squared norm overflows), the weights are NaN and so is the
aggregated gradient — never a finite-looking result. :func:`gradfn.aggregators.backward` raises a
``ValueError`` instead.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradfn import tree
from gradfn._internal.compat import is_compiling
from gradfn._internal.prng import fold_in
from gradfn.aggregators._checks import (
    check_active,
    check_grads,
    check_gram,
    check_gram_of,
    check_pref,
    reject_per_task_sequence,
    single_leaf,
)
from gradfn.transforms import EmptyState
from gradfn.typing import PyTree, State

__all__ = [
    "Aggregated",
    "Aggregator",
    "CounterState",
    "EmptyState",
    "check_active",
    "check_grads",
    "check_gram",
    "check_gram_of",
    "check_pref",
    "reject_per_task_sequence",
    "single_leaf",
    "task_count",
]

_WORK = torch.float64  # the K×K work runs in float64: cheap, and it keeps the QPs well posed


class Aggregated(NamedTuple):
    """An aggregation result.

    ``grad``: one task's pytree structure, ``Σ_k w_k g_k`` (for GradDrop the sum of ``rows``).
    ``weights``: ``(K,)``. ``rows``: task-stacked per-task contributions whose sum is ``grad``,
    only set by methods that are not a weighting of the rows (GradDrop), else ``None``.
    """

    grad: PyTree
    weights: Tensor
    rows: PyTree | None = None


class Aggregator(NamedTuple):
    """A gradient transform over task-stacked input (module docstring).

    ``init(tasks, *, device=None) -> state``;
    ``update(state, grads, params=None, *, active=None, gram=None) -> (state, Aggregated)``;
    ``weighting(state, gram, *, active=None) -> (state, w)`` or ``None`` (not a weighting).
    ``stateful`` says whether the state changes between calls (a counter or statistics).
    """

    init: Callable[..., State]
    update: Callable[..., tuple[State, Aggregated]]
    name: str = "aggregator"
    stateful: bool = False
    weighting: Callable[..., tuple[State, Tensor]] | None = None


def task_count(
    tasks: int | PyTree, device: torch.device | str | None = None
) -> tuple[int, torch.device | str | None]:
    """``(K, device)`` from what ``Aggregator.init`` receives: ``K`` itself or a task-stacked
    pytree (whose leading axis is ``K`` and whose device is used unless ``device`` is given)."""
    if isinstance(tasks, bool):
        raise TypeError("aggregator init: `tasks` must be K or a task-stacked pytree, got a bool")
    if isinstance(tasks, numbers.Integral):
        tasks = operator.index(tasks)  # a numpy integer as an int
        if tasks <= 0:
            raise ValueError(
                f"aggregator init: the number of tasks `tasks` must be positive, got {tasks}"
            )
        return tasks, device
    reject_per_task_sequence(tasks, "aggregator init")
    k = tree.num_tasks(tasks)
    return k, tree.leaves(tasks)[0].device if device is None else device


# --------------------------------------------------------------------------------------------
# K-space helpers


def gramian_of(grads: PyTree) -> Tensor:
    """The Gramian in :func:`gradfn.tree.gram_dtype` (float64 for float64 gradients).

    One leaf (a task-stacked matrix, the common case): ``J Jᵀ`` in one ``mm``."""
    x = single_leaf(grads)
    if x is None:
        ls = tree.leaves(grads)
        if len(ls) != 1:
            return tree.gramian(grads, dtype=None)
        x = ls[0]
    r = x if x.dim() == 2 else x.reshape(x.shape[0], -1)
    if x.dtype is not torch.float32 and x.dtype is not torch.float64:
        r = r.to(torch.float32)
    return r @ r.mT


def combine(grads: PyTree, w: Tensor) -> PyTree:
    """``Σ_k w_k g_k`` (:func:`gradfn.tree.weighted_sum`; one leaf: a single ``mv``)."""
    x = single_leaf(grads)
    if x is None or w.dim() != 1 or x.dim() == 0 or x.shape[0] != w.shape[0]:
        return tree.weighted_sum(grads, w)
    if w.dtype is not x.dtype or w.device != x.device:
        w = w.to(dtype=x.dtype, device=x.device)
    out = torch.mv(x.mT, w) if x.dim() == 2 else torch.mv(x.reshape(x.shape[0], -1).mT, w)
    if x.dim() != 2:
        out = out.reshape(x.shape[1:])
    return {next(iter(grads)): out} if type(grads) is dict else out


def restrict(gram: Tensor, active: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(G64, a)``: the Gramian in float64 with inactive rows/columns zeroed, and the float mask.

    Non-finite entries are replaced by zeros here (so no solver sees them) and :func:`finish`
    turns the weights into NaN.
    """
    g, a = restrict_or_all(gram, active)
    if a is None:
        return g, torch.ones(g.shape[0], dtype=_WORK, device=g.device)
    return g, a


def restrict_or_all(gram: Tensor, active: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """:func:`restrict`, with ``a = None`` (every task active) when ``active`` is None."""
    g = gram.to(_WORK)
    g = ((g + g.mT) * 0.5).nan_to_num(0.0, 0.0, 0.0)  # `finish` NaNs the weights
    if active is None:
        return g, None
    a = active.to(device=g.device, dtype=_WORK)
    return g * (a[:, None] * a), a


def pref_or_mean(pref: Tensor | None, a: Tensor | None, like: Tensor | None = None) -> Tensor:
    """Preference over the active tasks: ``pref * a`` or the uniform ``a / |a|``; with ``a =
    None`` (every task) ``pref`` or ``1/K``, ``K`` and the device those of ``like`` (``K×K``)."""
    if a is None:
        if like is None:
            raise ValueError("pref_or_mean: `like` is needed when `a` is None")
        if pref is None:
            return torch.full(
                (like.shape[0],), 1.0 / like.shape[0], dtype=_WORK, device=like.device
            )
        return pref.to(device=like.device, dtype=_WORK)
    if pref is None:
        return a / a.sum().clamp_min(1.0)
    return pref.to(device=a.device, dtype=_WORK) * a


def finish(w: Tensor, gram: Tensor, a: Tensor | None = None) -> Tensor:
    """Zero inactive weights (``a``), NaN-out on a non-finite Gramian, cast back to its dtype.

    ``w + 0·ΣG``: ``0·ΣG`` is 0 for a finite Gramian (summed in float64, so no finite float32
    Gramian overflows) and NaN as soon as one entry is NaN or infinite.
    """
    if a is not None:
        w = w * a
    return (w + gram.sum(dtype=_WORK) * 0.0).to(gram.dtype)


def normalize_trace(g: Tensor, norm_eps: float) -> Tensor:
    """``G / tr(G)``, or zeros when ``tr(G) <= norm_eps`` (TorchJD's ``normalize``)."""
    tr = torch.diagonal(g).sum()
    return torch.where(tr > norm_eps, g / tr, 0.0)


def eager_cpu(x: Tensor) -> bool:
    """Whether reading ``x`` back is free: eagerly, on the CPU, outside autograd and functorch
    transforms (compiled or on an accelerator, the tensor paths never sync)."""
    return not (
        x.device.type != "cpu"
        or x.requires_grad
        or is_compiling()
        or torch._C._functorch.is_functorch_wrapped_tensor(x)
    )


def host_values(x: Tensor) -> list[Any] | None:
    """``x.tolist()`` (Python floats, i.e. float64) when :func:`eager_cpu`, else ``None``.

    For ``K = 2`` a closed form is a handful of scalar operations: as Python arithmetic they cost
    less than launching one tensor op each (compiled or on an accelerator the tensor path runs).
    """
    return x.tolist() if eager_cpu(x) else None


def eye_like(g: Tensor) -> Tensor:
    return torch.eye(g.shape[0], dtype=g.dtype, device=g.device)


# --------------------------------------------------------------------------------------------
# building aggregators


def from_weighting(weights_fn: Callable[..., Tensor], fn: str) -> Callable[..., Aggregated]:
    """``aggregate(grads, *, gram=None, active=None, **hparams)`` from a Gramian weighting."""

    def aggregate(
        grads: PyTree, *, gram: Tensor | None = None, active: Tensor | None = None, **hparams: Any
    ) -> Aggregated:
        k = check_grads(grads, fn)
        if gram is not None:
            check_gram_of(gram, k, fn)
        g = gramian_of(grads) if gram is None else gram
        w = weights_fn(g, active=active, **hparams)
        return Aggregated(combine(grads, w), w)

    aggregate.__name__ = fn
    aggregate.weights_fn = weights_fn  # type: ignore[attr-defined]  # its keywords, for checks
    return aggregate


def stateless(aggregate: Callable[..., Aggregated], name: str, **hparams: Any) -> Aggregator:
    """An :class:`Aggregator` with an empty state around ``aggregate(grads, **hparams)``."""
    weights_fn = getattr(aggregate, "weights_fn", None)

    def init(tasks: int | PyTree, *, device: torch.device | str | None = None) -> EmptyState:
        task_count(tasks, device)
        return EmptyState()

    def update(
        state: EmptyState,
        grads: PyTree,
        params: PyTree = None,
        *,
        active: Tensor | None = None,
        gram: Tensor | None = None,
        **extra: Any,
    ) -> tuple[EmptyState, Aggregated]:
        return state, aggregate(grads, active=active, gram=gram, **hparams)

    weighting = None
    if weights_fn is not None:

        def weighting(
            state: EmptyState, gram: Tensor, *, active: Tensor | None = None
        ) -> tuple[EmptyState, Tensor]:
            return state, weights_fn(gram, active=active, **hparams)

    return Aggregator(init, update, name, stateful=False, weighting=weighting)


class CounterState(NamedTuple):
    """State of a randomised aggregator: ``seed`` (0-d int64) and ``count`` (0-d int64)."""

    seed: Tensor
    count: Tensor  # type: ignore[assignment]  # a field named like tuple.count


def seeded(
    aggregate: Callable[..., Aggregated], name: str, seed: int, **hparams: Any
) -> Aggregator:
    """An :class:`Aggregator` that feeds ``aggregate`` a fresh key each call, ``fold_in(seed,
    count)``, and counts its calls in the state."""
    weights_fn = getattr(aggregate, "weights_fn", None)

    def init(tasks: int | PyTree, *, device: torch.device | str | None = None) -> CounterState:
        _, device = task_count(tasks, device)
        z = torch.zeros((), dtype=torch.int64, device=device)
        return CounterState(z + seed, z)

    def update(
        state: CounterState,
        grads: PyTree,
        params: PyTree = None,
        *,
        active: Tensor | None = None,
        gram: Tensor | None = None,
        **extra: Any,
    ) -> tuple[CounterState, Aggregated]:
        key = fold_in(state.seed, state.count)
        out = aggregate(grads, seed=key, active=active, gram=gram, **hparams)
        return CounterState(state.seed, state.count + 1), out

    weighting = None
    if weights_fn is not None:

        def weighting(
            state: CounterState, gram: Tensor, *, active: Tensor | None = None
        ) -> tuple[CounterState, Tensor]:
            key = fold_in(state.seed, state.count)
            w = weights_fn(gram, seed=key, active=active, **hparams)
            return CounterState(state.seed, state.count + 1), w

    return Aggregator(init, update, name, stateful=True, weighting=weighting)


def from_stateful_weighting(
    init_fn: Callable[..., State],
    weights_fn: Callable[..., tuple[State, Tensor]],
    name: str,
) -> Aggregator:
    """A stateful :class:`Aggregator` from ``init_fn(K, device=) -> state`` and a Gramian
    weighting ``weights_fn(state, gram, *, active=None) -> (state, w)``."""

    def init(tasks: int | PyTree, *, device: torch.device | str | None = None) -> State:
        k, device = task_count(tasks, device)
        return init_fn(k, device=device)

    def update(
        state: State,
        grads: PyTree,
        params: PyTree = None,
        *,
        active: Tensor | None = None,
        gram: Tensor | None = None,
        **extra: Any,
    ) -> tuple[State, Aggregated]:
        k = check_grads(grads, name)
        if gram is not None:
            check_gram_of(gram, k, name)
        g = gramian_of(grads) if gram is None else gram
        state, w = weights_fn(state, g, active=active)
        return state, Aggregated(combine(grads, w), w)

    return Aggregator(init, update, name, stateful=True, weighting=weights_fn)
