"""FairGrad (Ban & Ji 2024, "Fair Resource Allocation in Multi-Task Learning", arXiv:2402.15638,
Eq. 4 and Algorithm 1): α-fair task weights from the Gramian, stateless.

The update ``d = Σ_k w_k g_k`` maximises the α-fair utility of the tasks' rates ``⟨g_k, d⟩``;
its weights solve ``(G w)_k = w_k^{−1/α}`` with ``w > 0``. This is the stationarity condition of
the strictly convex ``φ(w) = ½ wᵀ G w − Σ_k u_α(w_k)``, ``u_α' (w) = w^{−1/α}``, solved here by
damped Newton (``w ← w − t Δ``, ``Δ = H⁻¹ ∇φ``, ``H = G + diag(w^{−1/α−1}/α)``, ``t = 1/(1+λ)``
with ``λ`` the Newton decrement, capped to stay positive) on ``Ĝ = G/‖G‖_F`` from the diagonal
solution ``w_k = Ĝ_kk^{−α/(α+1)}``, then rescaled: ``w = ŵ · ‖G‖_F^{−α/(α+1)}``. ``α = 1`` is
Nash-MTL's bargaining solution (``G w = 1/w``); ``α = 0`` is linear scalarization (``w = 1/K``,
as TorchJD). Tasks with a zero gradient get weight 0 (no solution exists for them). TorchJD and
the official code solve the same equation with ``scipy.optimize.least_squares`` on the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradfn._internal.checks import check_int, check_nonnegative
from gradfn.aggregators._base import check_active, check_gram, finish, from_weighting, restrict

__all__ = ["fairgrad", "fairgrad_weights"]


def fairgrad_weights(
    gram: Tensor, *, alpha: float = 1.0, iters: int = 30, active: Tensor | None = None
) -> Tensor:
    """The α-fair weights ``w`` (``(K,)``) with ``(G w)_k = w_k^{−1/α}`` on the active tasks with
    a non-zero gradient, 0 elsewhere (module docstring)."""
    k = check_gram(gram, "fairgrad_weights")
    check_active(active, k, "fairgrad_weights")
    alpha = check_nonnegative("alpha", alpha)
    check_int("iters", iters, 1)
    g, a = restrict(gram, active)
    if alpha == 0.0:
        return finish(a / a.sum().clamp_min(1.0), gram)
    diag = torch.diagonal(g)
    a = a * (diag > diag.max() * k * torch.finfo(gram.dtype).eps).to(g.dtype)
    g = g * a[:, None] * a[None, :]
    fro = torch.linalg.matrix_norm(g)
    scale = torch.where(fro > 0, fro, 1.0)
    gn = g / scale
    dn = torch.diagonal(gn)
    p = alpha / (alpha + 1.0)
    x = torch.where(a > 0, torch.where(dn > 0, dn, 1.0).pow(-p), 1.0)
    on = a > 0
    for _ in range(iters):
        r = torch.where(on, gn @ x - x.pow(-1.0 / alpha), 0.0)
        curv = torch.where(on, x.pow(-1.0 / alpha - 1.0) / alpha, 1.0)
        dx = torch.linalg.solve_ex(gn + torch.diag(curv), r[:, None])[0][:, 0]
        dec = (r @ dx).clamp_min(0.0).sqrt()
        room = torch.where(dx > 0, x / torch.where(dx > 0, dx, 1.0), float("inf")).min()
        t = torch.minimum(1.0 / (1.0 + dec), 0.99 * room)
        x = x - t * dx
    w = x * a * scale.pow(-p)
    return finish(w, gram)


fairgrad = from_weighting(fairgrad_weights, "fairgrad")
fairgrad.__doc__ = """FairGrad on task-stacked ``grads``: ``Aggregated(Σ_k w_k g_k, w)`` with the α-fair
weights of :func:`fairgrad_weights` (``alpha=1.0``, ``iters=30``; ``gram=``, ``active=``)."""
