"""The shape every gradfn algorithm takes: an ``(init, update)`` pair (DESIGN.md layer 4).

``init(params) -> state`` and ``update(state, params, batch) -> (state, grads)``. The loss
function and hyper-parameters are bound when the transform is built; the state is a NamedTuple
of tensors (counters are 0-d tensors), so it can be saved with ``torch.save``, compared leaf by
leaf and carried through ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

PyTree = Any
State = Any

__all__ = ["InitFn", "Transform", "UpdateFn"]

InitFn = Callable[[PyTree], State]
UpdateFn = Callable[..., tuple[State, PyTree]]


class Transform(NamedTuple):
    """A pure algorithm.

    ``init(params) -> state``; ``update(state, params, batch) -> (state, grads)``.
    """

    init: InitFn
    update: UpdateFn
