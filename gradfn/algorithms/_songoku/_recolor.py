"""The recolouring every ``R`` steps: ``τ(t)``, ``ρ = −cos`` of the EMAs, the conflict graph,
Welsh–Powell groups and minimum-coverage duplication (arXiv:2509.16959, §3–§4)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gradfn.algorithms._songoku._config import SonGokuConfig
from gradfn.algorithms._songoku._state import SonGokuState
from gradfn.conflict import color, duplicate_min_coverage, groups_from_colors, interference
from gradfn.schedules import tau_value
from gradfn.tree import gramian

__all__ = ["recolor"]


def recolor(
    config: SonGokuConfig,
    state: SonGokuState,
    psum: Callable[[Tensor], Tensor] | None = None,
) -> SonGokuState:
    """The state with new groups from its EMAs (pure, tensor-only; fixed-length loops).
    ``psum``: the EMAs are shards (FSDP); their partial Gramian is summed over the ranks.

    The cycle restarts at group 0 (group 1 with ``legacy_pointer``), and ``τ`` is evaluated at
    ``t`` = completed steps. ``ρ > τ`` is decided in the EMAs' precision (float64 EMAs: float64).
    """
    # ρ and τ are compared in the EMA's precision (float64 EMAs: float64); the state keeps float32
    gram = gramian(state.ema, dtype=None)
    rho = interference(gram if psum is None else psum(gram), config.eps)
    tau = tau_value(config.tau_schedule, state.step, dtype=rho.dtype)
    adj, tau_used = config.graph.adjacency(rho, tau)
    rho = rho.to(torch.float32)
    groups, num_groups = groups_from_colors(color(adj))
    if config.min_updates_per_cycle > 1:
        groups = duplicate_min_coverage(groups, adj, config.min_updates_per_cycle)
    start = torch.ones_like(num_groups) if config.legacy_pointer else torch.zeros_like(num_groups)
    return state._replace(
        groups=groups,
        num_groups=num_groups,
        group_index=torch.remainder(start, num_groups),
        rho=rho,
        adjacency=adj,
        tau=tau_used.to(torch.float32),
        refreshes=state.refreshes + 1,
    )
