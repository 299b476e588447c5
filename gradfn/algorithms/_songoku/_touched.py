"""Which parameters a SON-GOKU step touched (arXiv:2509.16959, Alg. 1: only the active group's
losses are back-propagated, so a parameter that no active task reaches gets no gradient).

The functional step keeps the pytree structure of ``params`` and returns exact zeros for such
parameters. Writing those zeros to ``.grad`` is not the same as leaving ``.grad`` None: Adam
(and any optimizer with momentum or weight decay) still moves a parameter with a zero gradient.
:func:`touched_mask` says which leaves must stay ``None``.
"""

from __future__ import annotations

import optree
import torch
from torch import Tensor

from gradfn._internal.compat import is_compiling
from gradfn.algorithms._songoku._state import SonGokuState
from gradfn.typing import PyTree

__all__ = ["touched_mask"]


def touched_mask(state: SonGokuState, usage: PyTree) -> PyTree:
    """Per-leaf ``()`` bool tensors: did the step that returned ``state`` touch the leaf?

    Args:
        state: the state *returned* by ``step`` / ``update`` (its ``active`` is the group that
            ran, its ``skipped`` whether the step was skipped).
        usage: a pytree with the structure of ``params`` of ``(K,)`` bool tensors, ``usage[k]``:
            task ``k``'s loss reaches the leaf, e.g. the third element of
            ``value_and_per_task_grads(loss_fn, params, batch, return_usage=True)`` (every task
            differentiated; compute it once, it depends on the model, not the values).

    Returns:
        ``(usage & active).any() & ~skipped`` per leaf, the structure of ``usage`` (tensor-only,
        compiles with ``torch.compile(fullgraph=True)``). A leaf with False must keep
        ``.grad = None`` (its returned gradient is zero); a skipped step touches nothing.
    """
    active = state.active
    k = active.shape[0]
    leaves, spec = optree.tree_flatten(usage)
    if not leaves:
        raise ValueError("`usage` must hold one (K,) bool tensor per parameter, got no leaves")
    if not is_compiling():
        for leaf in leaves:
            if not isinstance(leaf, Tensor) or leaf.dtype != torch.bool or leaf.shape != (k,):
                raise ValueError(
                    f"`usage` leaves must be ({k},) bool tensors (one entry per task), got "
                    f"{getattr(leaf, 'shape', type(leaf).__name__)} "
                    f"{getattr(leaf, 'dtype', '')}"
                )
    ok = ~state.skipped
    out = [(u.to(active.device) & active).any() & ok for u in leaves]
    return optree.tree_unflatten(spec, out)
