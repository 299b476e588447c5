"""Random Loss Weighting (Lin et al. 2022, *Reasonable Effectiveness of Random Weighting*,
arXiv:2111.10603): fresh weights every step, ``w = softmax(z)`` with ``z ~ N(0, I_K)``.

The weights sum to 1 (as the paper and LibMTL). The normal draws come from gradfn's counter-based
hash RNG (Box–Muller on two uniforms), keyed by ``fold_in(seed, count)``: the same seed gives the
same weights eagerly, compiled and on any device.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradfn._internal.checks import check_seed
from gradfn._internal.prng import fold_in, uniform
from gradfn.weighting._base import LossWeighting, check_losses, task_count

__all__ = ["RLWState", "rlw", "rlw_weights"]


class RLWState(NamedTuple):
    """``seed``, ``count``: 0-d int64; the draw of a call is keyed by ``fold_in(seed, count)``.
    ``weights``: ``(K,)`` float32, the last draw (``1/K`` before the first); its length is the
    ``K`` that ``update`` checks the losses against."""

    seed: Tensor
    count: Tensor  # type: ignore[assignment]  # a field named like tuple.count
    weights: Tensor


def rlw_weights(key: Tensor, num_tasks: int) -> Tensor:
    """``softmax(z)``, ``z`` ``(K,)`` standard normal draws from ``key`` (float32)."""
    u = uniform(key, (2, num_tasks), device=key.device)
    z = torch.sqrt(-2.0 * torch.log1p(-u[0])) * torch.cos((2.0 * math.pi) * u[1])
    return torch.softmax(z, dim=0)


def rlw(*, seed: int = 0) -> LossWeighting:
    """The RLW :class:`LossWeighting`: a new draw per call, counted in the state."""
    seed = check_seed("seed", seed)

    def init(tasks: int | Tensor, *, device: torch.device | str | None = None) -> RLWState:
        k, device = task_count(tasks, device)
        z = torch.zeros((), dtype=torch.int64, device=device)
        return RLWState(z + seed, z, torch.full((k,), 1.0 / k, device=device))

    def update(state: RLWState, losses: Tensor, params: Any = None) -> tuple[RLWState, Tensor]:
        losses = check_losses(losses, state.weights.shape[0], "rlw")
        w = rlw_weights(fold_in(state.seed, state.count), losses.shape[0])
        return RLWState(state.seed, state.count + 1, w.to(state.weights.device)), w.to(
            losses.device
        )

    return LossWeighting(init, update, "rlw")
