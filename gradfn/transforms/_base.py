"""The gradient-transform protocol: a pure ``(init, update)`` pair, and its combinators.

* ``init(params) -> state``
* ``update(state, updates, params=None, **extra) -> (state, updates)``

The state comes first and is returned first, everywhere in gradfn (the algorithms'
``update(state, params, batch) -> (state, grads)`` too). That is the mirror image of Optax's
``update(updates, state, params)``, which returns ``(updates, state)``: swap the arguments when
porting Optax code. ``extra`` carries keyword arguments that some transforms read and the others
ignore (``gram=`` a precomputed Gramian, ``active=`` a task mask, ``nonfinite=`` a precomputed
skip flag); :func:`chain` hands them to every link. States are NamedTuples of tensors (counters
are 0-d int64 tensors), so they can be saved with ``torch.save``, compared leaf by leaf and
carried through ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from gradfn.typing import PyTree, State

__all__ = ["EmptyState", "GradientTransform", "chain", "identity", "stateless"]


class GradientTransform(NamedTuple):
    """``init(params) -> state``; ``update(state, updates, params=None, **extra) -> (state, updates)``."""

    init: Callable[[PyTree], State]
    update: Callable[..., tuple[State, PyTree]]


class EmptyState(NamedTuple):
    """The state of a stateless transform."""


def stateless(fn: Callable[[PyTree, PyTree], PyTree]) -> GradientTransform:
    """A transform with an empty state around ``fn(updates, params) -> updates``."""

    def init(params: PyTree) -> EmptyState:
        return EmptyState()

    def update(
        state: EmptyState, updates: PyTree, params: PyTree = None, **extra: Any
    ) -> tuple[EmptyState, PyTree]:
        return state, fn(updates, params)

    return GradientTransform(init, update)


def identity() -> GradientTransform:
    """The transform that returns its updates unchanged."""
    return stateless(lambda updates, params: updates)


def chain(*transforms: GradientTransform) -> GradientTransform:
    """Apply ``transforms`` left to right; the state is the tuple of their states.

    Every link receives the same ``params`` and ``extra`` keyword arguments.
    """
    for t in transforms:
        if not (isinstance(t, tuple) and callable(getattr(t, "init", None))):
            raise TypeError(f"chain: expected GradientTransforms, got {type(t).__name__}")
        if hasattr(t, "weighting"):
            raise TypeError(
                "chain: an aggregator returns an Aggregated (the gradient and its weights), not "
                "updates; call it, then chain the transforms on its `.grad`"
            )

    def init(params: PyTree) -> tuple[State, ...]:
        return tuple(t.init(params) for t in transforms)

    def update(
        state: tuple[State, ...], updates: PyTree, params: PyTree = None, **extra: Any
    ) -> tuple[tuple[State, ...], PyTree]:
        new = []
        for t, s in zip(transforms, state, strict=True):
            s, updates = t.update(s, updates, params, **extra)
            new.append(s)
        return tuple(new), updates

    return GradientTransform(init, update)
