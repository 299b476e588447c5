"""Type aliases used across gradfn, defined once.

* ``PyTree``: any nesting of dicts / lists / tuples / NamedTuples with tensor leaves.
* ``Params``: ``dict[str, Tensor]`` keyed by dotted parameter names (``model.named_parameters()``).
* ``TaskStacked``: a pytree with the structure of ``params`` and a leading task axis ``K`` on every
  leaf, ``grads[name].shape == (K, *params[name].shape)``.
* ``LossFn``: ``loss_fn(params, batch)`` returning the ``K`` task losses (dict, tuple / list or a
  1-D tensor).
* ``Reducer``: ``reduce(tree) -> tree`` averaging a pytree across ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeAlias

from torch import Tensor

__all__ = [
    "Batch",
    "LossFn",
    "Params",
    "PyTree",
    "Reducer",
    "State",
    "Strategy",
    "TaskStacked",
]

PyTree: TypeAlias = Any
State: TypeAlias = Any
Batch: TypeAlias = Any
Params: TypeAlias = Mapping[str, Tensor]
TaskStacked: TypeAlias = Any
LossFn: TypeAlias = Callable[[Any, Any], Any]
Reducer: TypeAlias = Callable[[Any], Any]
Strategy: TypeAlias = Literal["auto", "vmap", "loop"]
