"""Nash-MTL (Navon et al. 2022, "Multi-Task Learning as a Bargaining Game", Algorithm 1),
stateful, as in TorchJD.

The bargaining solution solves ``G α = 1/α`` (``α > 0``), i.e. ``α_i ⟨g_i, Jᵀα⟩ = 1``. It is
the minimiser of the strictly convex, self-concordant ``½ αᵀ Ĝ α − Σ log α_i`` on
``Ĝ = G/‖G‖_F``, found by damped Newton (``α ← α − Δ/(1+λ)``, ``λ`` the Newton decrement: it
stays feasible and converges from any start), then rescaled ``α = α̂ / √‖G‖_F``. TorchJD
approximates the same point with cvxpy/ECOS (a sequence of convex programs). The update is
``Jᵀα``, scaled down to norm ``max_norm`` when longer (``max_norm = 0``: no clipping). Weights are
recomputed every ``update_weights_every`` calls and reused in between; tasks with a zero gradient
get weight 0 (no bargaining solution exists for them).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from gradfn._internal.checks import check_int, check_nonnegative
from gradfn.aggregators._base import (
    Aggregator,
    check_active,
    check_gram,
    from_stateful_weighting,
    restrict,
)

__all__ = ["NashMTLState", "nash_mtl", "nash_mtl_init", "nash_mtl_solve", "nash_mtl_weights"]


class NashMTLState(NamedTuple):
    """``alpha``: last solved weights before clipping (``K``, float64); ``step``: 0-d int64."""

    alpha: Tensor
    step: Tensor


def nash_mtl_init(num_tasks: int, *, device: torch.device | str | None = None) -> NashMTLState:
    if num_tasks <= 0:
        raise ValueError(f"nash_mtl_init: `num_tasks` must be positive, got {num_tasks}")
    return NashMTLState(
        torch.ones(num_tasks, dtype=torch.float64, device=device),
        torch.zeros((), dtype=torch.int64, device=device),
    )


def nash_mtl_solve(gram: Tensor, *, iters: int = 20, active: Tensor | None = None) -> Tensor:
    """The bargaining weights ``α`` with ``α ⊙ (G α) = 1`` on the active, non-zero tasks."""
    k = check_gram(gram, "nash_mtl_solve")
    check_active(active, k, "nash_mtl_solve")
    g, a = restrict(gram, active)
    diag = torch.diagonal(g)
    a = a * (diag > diag.max() * k * torch.finfo(gram.dtype).eps).to(g.dtype)
    g = g * a[:, None] * a[None, :]
    fro = torch.linalg.matrix_norm(g)
    gn = g / torch.where(fro > 0, fro, 1.0)
    dn = torch.diagonal(gn)
    x = torch.where(a > 0, torch.where(dn > 0, dn, 1.0).rsqrt(), 1.0)
    for _ in range(iters):
        r = (gn @ x - 1.0 / x) * a
        h = gn * a[:, None] * a[None, :] + torch.diag(torch.where(a > 0, 1.0 / (x * x), 1.0))
        dx = torch.linalg.solve_ex(h, r[:, None])[0][:, 0]
        dec = (r @ dx).clamp_min(0.0).sqrt()
        x = x - dx / (1.0 + dec)
    alpha = x * a / torch.where(fro > 0, fro, 1.0).sqrt()
    return torch.where(torch.isfinite(gram).all(), alpha, float("nan"))


def nash_mtl_weights(
    state: NashMTLState,
    gram: Tensor,
    *,
    max_norm: float = 1.0,
    update_weights_every: int = 1,
    iters: int = 20,
    active: Tensor | None = None,
) -> tuple[NashMTLState, Tensor]:
    """One Nash-MTL step on the Gramian: ``(new_state, w)``."""
    k = check_gram(gram, "nash_mtl_weights")
    if state.alpha.shape != (k,):
        raise ValueError(
            f"nash_mtl_weights: state is for {state.alpha.shape[0]} tasks, gram has {k}"
        )
    max_norm = check_nonnegative("max_norm", max_norm)
    update_weights_every = check_int("update_weights_every", update_weights_every, 1)
    iters = check_int("iters", iters, 1)
    fresh = nash_mtl_solve(gram, iters=iters, active=active)
    recompute = (state.step % update_weights_every) == 0
    alpha = torch.where(recompute, fresh, state.alpha.to(fresh.device))
    w = alpha
    if max_norm > 0:
        norm = (alpha @ gram.to(alpha.dtype) @ alpha).clamp_min(0.0).sqrt()
        w = torch.where(norm > max_norm, alpha / norm * max_norm, alpha)
    finite = torch.isfinite(gram).all()
    kept = torch.where(finite, alpha, state.alpha.to(alpha.device)).to(state.alpha.dtype)
    return NashMTLState(kept, state.step + 1), w.to(gram.dtype)


def nash_mtl(
    *, max_norm: float = 1.0, update_weights_every: int = 1, iters: int = 20
) -> Aggregator:
    """The Nash-MTL :class:`Aggregator` (stateful)."""
    max_norm = check_nonnegative("max_norm", max_norm)
    update_weights_every = check_int("update_weights_every", update_weights_every, 1)
    iters = check_int("iters", iters, 1)

    def weights(
        state: NashMTLState, gram: Tensor, *, active: Tensor | None = None
    ) -> tuple[NashMTLState, Tensor]:
        return nash_mtl_weights(
            state,
            gram,
            max_norm=max_norm,
            update_weights_every=update_weights_every,
            iters=iters,
            active=active,
        )

    return from_stateful_weighting(nash_mtl_init, weights, "nash_mtl")
