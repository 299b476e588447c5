"""``apply_if_finite``: the one skip policy for non-finite updates."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import optree
import torch
from torch import Tensor

from gradfn._internal.checks import check_choice
from gradfn._internal.compat import is_compiling
from gradfn.transforms._base import GradientTransform
from gradfn.tree import leaves, tree_any_nonfinite, tree_where
from gradfn.typing import PyTree, State

__all__ = ["ApplyIfFiniteState", "apply_if_finite", "skip_if_nonfinite"]


class ApplyIfFiniteState(NamedTuple):
    """``inner``: the wrapped transform's state; ``skipped`` (0-d bool): the last update was
    skipped; ``num_skipped`` (0-d int64): updates skipped so far."""

    inner: State
    skipped: Tensor
    num_skipped: Tensor


def skip_if_nonfinite(
    bad: Tensor,
    state: ApplyIfFiniteState,
    new_inner: State,
    updates: PyTree,
    *,
    select: Literal["where", "host"] = "where",
) -> tuple[ApplyIfFiniteState, PyTree]:
    """The skip policy of :func:`apply_if_finite`: where the 0-d bool ``bad`` holds, keep
    ``state.inner`` instead of ``new_inner`` and return zero updates; count the skip.

    ``select="where"``: tensor-only (``torch.where``); ``select="host"``: one host read, the old
    state object handed back without a copy (eager; falls back to ``"where"`` while compiling).
    """
    if select == "host" and not is_compiling():
        if bool(bad):
            new_inner = state.inner
            updates = optree.tree_map(torch.zeros_like, updates)
    else:
        new_inner = tree_where(bad, state.inner, new_inner)
        updates = optree.tree_map(lambda x: torch.where(bad, torch.zeros_like(x), x), updates)
    skipped = bad.to(device=state.skipped.device)
    return ApplyIfFiniteState(new_inner, skipped, state.num_skipped + skipped.long()), updates


def apply_if_finite(
    inner: GradientTransform, *, select: Literal["where", "host"] = "where"
) -> GradientTransform:
    """Skip an update whose input holds a NaN or an infinity: ``inner``'s state stays as it was
    and the returned updates are zeros (as Optax's ``apply_if_finite``).

    The test is on the input updates (one fused norm, :func:`gradfn.tree.tree_any_nonfinite`)
    unless the caller passes ``nonfinite=`` (a 0-d bool) to ``update``, e.g. one computed on a
    ``K×K`` Gramian, where any non-finite entry of the gradients shows. ``select="where"`` keeps
    the old state with ``torch.where`` (tensor-only, compiles); ``select="host"`` reads the flag on
    the host once and hands back the old state object itself, without copying it (eager callers
    that never reuse a state; under ``torch.compile`` it falls back to ``"where"``).
    """
    check_choice("select", select, ("where", "host"))

    def init(params: PyTree) -> ApplyIfFiniteState:
        dev = leaves(params)[0].device
        return ApplyIfFiniteState(
            inner.init(params),
            torch.zeros((), dtype=torch.bool, device=dev),
            torch.zeros((), dtype=torch.int64, device=dev),
        )

    def update(
        state: ApplyIfFiniteState,
        updates: PyTree,
        params: PyTree = None,
        *,
        nonfinite: Tensor | None = None,
        **extra: Any,
    ) -> tuple[ApplyIfFiniteState, PyTree]:
        bad = tree_any_nonfinite(updates) if nonfinite is None else nonfinite
        new_inner, out = inner.update(state.inner, updates, params, **extra)
        return skip_if_nonfinite(bad, state, new_inner, out, select=select)

    return GradientTransform(init, update)
