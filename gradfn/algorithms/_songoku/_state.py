"""SON-GOKU's state: a NamedTuple of tensors (checkpointable, comparable, compile-friendly)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from gradfn.aggregators import InverseNormState
from gradfn.algorithms._songoku._config import SonGokuConfig
from gradfn.algorithms._songoku._ema import ema_like
from gradfn.transforms import EmptyState
from gradfn.typing import Params, PyTree, State

__all__ = ["SonGokuState", "group_lists", "init_state", "shared_names"]


class SonGokuState(NamedTuple):
    """State of SON-GOKU (all tensors; ``K`` tasks).

    Attributes:
        step: () int64 — completed steps ``t`` (skipped steps do not count).
        group_index: () int64 — index of the group that runs at the next step.
        groups: (K, K) bool — ``groups[g, k]``: task ``k`` is in group ``g``; rows
            ``≥ num_groups`` are unused.
        num_groups: () int64 — number of groups ``m`` in the cycle.
        ema: EMA of the shared gradients: task-stacked ``{name: (K, *shape)}``, or ``(K, d_sk)``
            with a sketch.
        ema_count: (K,) int64 — EMA updates received per task.
        rho: (K, K) float32 — interference ``−cos`` at the last refresh (the edge test ``ρ > τ``
            itself is made in the EMA's precision).
        adjacency: (K, K) bool — conflict graph at the last refresh.
        tau: () float32 — threshold used at the last refresh (NaN before the first).
        losses: (K,) float32 — task losses of the last step (recorded even when it was skipped).
        active: (K,) bool — tasks of the last step's group.
        skipped: () bool — the last step was skipped (non-finite loss or gradient).
        refreshes: () int64 — number of refreshes so far.
        aggregator: the in-group aggregator's state (an empty state without one).
        loss_weighting: the loss weighting's state (an empty state without one).
    """

    step: Tensor
    group_index: Tensor
    groups: Tensor
    num_groups: Tensor
    ema: PyTree
    ema_count: Tensor
    rho: Tensor
    adjacency: Tensor
    tau: Tensor
    losses: Tensor
    active: Tensor
    skipped: Tensor
    refreshes: Tensor
    aggregator: State
    loss_weighting: State = EmptyState()

    @property
    def ptr(self) -> Tensor:
        """Deprecated name of :attr:`group_index` (gradfn 0.1)."""
        return self.group_index


def shared_names(config: SonGokuConfig, params: Params) -> list[str]:
    """The names of the shared parameters (``ValueError`` when ``config.shared`` selects none)."""
    names = [n for n in params if config.is_shared(n)]
    if not names:
        raise ValueError("`shared` selects no parameter of `params`")
    return names


def init_state(config: SonGokuConfig, params: Params) -> SonGokuState:
    """Every task in one group (the τ warm-up until the first refresh), zero EMAs."""
    if not isinstance(params, Mapping) or not params:
        raise TypeError("`params` must be a non-empty mapping of dotted names to tensors")
    k = config.num_tasks
    dev = next(iter(params.values())).device
    groups = torch.zeros(k, k, dtype=torch.bool, device=dev)
    groups[0] = True
    i64 = torch.int64
    ema = ema_like(config, params, shared_names(config, params))
    agg = EmptyState() if config.aggregator is None else config.aggregator.init(k, device=dev)
    if isinstance(agg, InverseNormState) and any(
        params[n].dtype == torch.float64 for n in shared_names(config, params)
    ):  # float64 gradients keep a float64 norm EMA (its dtype is fixed from the start)
        agg = InverseNormState(agg.norm_ema.to(torch.float64))
    lw = (
        EmptyState() if config.loss_weighting is None else config.loss_weighting.init(k, device=dev)
    )
    return SonGokuState(
        step=torch.zeros((), dtype=i64, device=dev),
        group_index=torch.zeros((), dtype=i64, device=dev),
        groups=groups,
        num_groups=torch.ones((), dtype=i64, device=dev),
        ema=ema,
        ema_count=torch.zeros(k, dtype=i64, device=dev),
        rho=torch.zeros(k, k, dtype=torch.float32, device=dev),
        adjacency=torch.zeros(k, k, dtype=torch.bool, device=dev),
        tau=torch.full((), float("nan"), dtype=torch.float32, device=dev),
        losses=torch.zeros(k, dtype=torch.float32, device=dev),
        active=torch.zeros(k, dtype=torch.bool, device=dev),
        skipped=torch.zeros((), dtype=torch.bool, device=dev),
        refreshes=torch.zeros((), dtype=i64, device=dev),
        aggregator=agg,
        loss_weighting=lw,
    )


def group_lists(state: SonGokuState) -> list[list[int]]:
    """The groups of the cycle as lists of task indices, in cycle order (reads the host)."""
    m = int(state.num_groups)
    return [torch.nonzero(state.groups[g]).flatten().tolist() for g in range(m)]
