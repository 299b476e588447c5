"""The algorithm protocol: ``init(params) -> state``, ``update(state, params, batch) -> (state, grads)``.

An *algorithm* owns the whole step, from the batch to the gradient to hand an optimizer: its loss
function and hyper-parameters are bound when it is built. A *gradient transform*
(:mod:`gradfn.transforms`) maps gradients to gradients; an algorithm is built from them. The state
is a NamedTuple of tensors (counters are 0-d tensors), so it can be saved with ``torch.save``,
compared leaf by leaf and carried through ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from gradfn.typing import PyTree, State

__all__ = ["Algorithm"]


@dataclass(frozen=True)
class Algorithm:
    """A pure algorithm: ``init(params) -> state``; ``update(state, params, batch) -> (state,
    grads)``. Unpacks as ``init, update = algorithm``."""

    init: Callable[[PyTree], State]
    update: Callable[..., tuple[State, PyTree]]

    def __iter__(self) -> Iterator[Callable[..., Any]]:
        return iter((self.init, self.update))
