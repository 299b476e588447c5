"""First moments: bias-corrected momentum and the EMA of update norms (GCond, arXiv:2509.07252)."""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from gradfn import tree
from gradfn._internal.checks import check_beta, check_finite, check_nonnegative
from gradfn.transforms._base import GradientTransform
from gradfn.transforms._clipping import task_norms
from gradfn.typing import PyTree

__all__ = ["MomentumState", "NormEmaState", "ema_of_norms", "momentum", "norm_ema"]


class NormEmaState(NamedTuple):
    """``ema``: () or (K,) float32."""

    ema: Tensor


class MomentumState(NamedTuple):
    """``count``: 0-d int64, updates so far (``t``); ``mu``: the first moment, in the storage dtype."""

    count: Tensor  # type: ignore[assignment]  # a field named like tuple.count
    mu: PyTree


def ema_of_norms(ema: Tensor, norms: Tensor, beta: float, eps: float) -> Tensor:
    """``e ← max(β·e + (1−β)·‖u‖, eps)`` elementwise (no bias correction)."""
    return torch.clamp(beta * ema + (1.0 - beta) * norms, min=eps)


def norm_ema(
    beta: float = 0.95,
    *,
    num_tasks: int | None = None,
    initial: float = 1.0,
    eps: float = 1e-8,
) -> GradientTransform:
    """Track :func:`ema_of_norms` of the updates (starting at ``initial``); the updates pass
    through unchanged. ``num_tasks``: one EMA per slice of the leading task axis (state ``(K,)``),
    else one global EMA (state ``()``)."""
    beta = check_beta("beta", beta)
    initial = check_finite("initial", initial)
    eps = check_nonnegative("eps", eps)

    def init(params: PyTree) -> NormEmaState:
        device = tree.leaves(params)[0].device
        shape = () if num_tasks is None else (num_tasks,)
        return NormEmaState(torch.full(shape, float(initial), device=device))

    def update(
        state: NormEmaState, updates: PyTree, params: PyTree = None, **extra: Any
    ) -> tuple[NormEmaState, PyTree]:
        norms = task_norms(updates, num_tasks is not None)
        return NormEmaState(ema_of_norms(state.ema, norms, beta, eps)), updates

    return GradientTransform(init, update)


def momentum(
    beta: float = 0.85, *, bias_correction: bool = True, dtype: torch.dtype = torch.float32
) -> GradientTransform:
    """First-moment EMA: ``t ← t+1``, ``M ← β·M + (1−β)·u``, output ``M/(1−β^t)`` (``M``
    without ``bias_correction``). ``M`` is stored in ``dtype`` (``torch.bfloat16`` reproduces
    GCond's reference storage and its two roundings per update, ``β·M`` then ``+ (1−β)·u``); the
    output has that dtype too."""
    beta = check_beta("beta", beta)

    def init(params: PyTree) -> MomentumState:
        leaf0 = tree.leaves(params)[0]
        count = torch.zeros((), dtype=torch.int64, device=leaf0.device)
        return MomentumState(count, tree.tree_zeros_like(params, dtype=dtype))

    def _ema(m: Tensor, u: Tensor) -> Tensor:
        if dtype in (torch.bfloat16, torch.float16) and m.dtype == dtype:
            # reduced-precision storage: β·M rounded, then + (1−β)·u rounded, as GCond's
            # reference updates its bfloat16 momentum (``M.mul_(β).add_(G, alpha=1−β)``)
            return m.mul(beta).add_(u, alpha=1.0 - beta)
        # β·m + (1−β)·u in one pass (lerp from u towards m by β)
        if m.dtype == u.dtype == dtype:
            return torch.lerp(u, m, beta)
        return torch.lerp(u.float(), m.float(), beta).to(dtype)

    def update(
        state: MomentumState, updates: PyTree, params: PyTree = None, **extra: Any
    ) -> tuple[MomentumState, PyTree]:
        count = state.count + 1
        ms, spec = optree.tree_flatten(state.mu)
        us = optree.tree_flatten(updates)[0] if ms else []
        fused = dtype == torch.float32 and all(
            m.dtype == u.dtype == dtype and m.shape == u.shape for m, u in zip(ms, us, strict=True)
        )
        if fused and ms:  # one foreach dispatch for all leaves, the same arithmetic as _ema
            mu = optree.tree_unflatten(spec, torch._foreach_lerp(us, ms, beta))
        else:
            mu = optree.tree_map(_ema, state.mu, updates)
        if bias_correction:
            bc = 1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), count).float()
            if fused and ms:
                out = optree.tree_unflatten(spec, torch._foreach_div(optree.tree_leaves(mu), bc))
            else:
                out = tree.tree_map(lambda m: (m.float() / bc).to(dtype), mu)
        else:
            out = mu
        return MomentumState(count, mu), out

    return GradientTransform(init, update)
