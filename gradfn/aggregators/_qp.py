"""Fixed-iteration tensor QP solvers on ``K×K`` problems (no host syncs, no data-dependent
Python branches), so every method built on them compiles with ``fullgraph=True``.

Both use the primal-dual active-set method (Hintermüller, Ito & Kunisch 2002, the semismooth
Newton method for box constraints): guess which constraints are tight, solve the equality-
constrained system with ``torch.linalg.solve_ex``, update the guess from the multipliers, repeat.
For the small, regularised (positive-definite) problems here it reaches the exact solution in a
few iterations; once the active set repeats, further iterations reproduce the same point. The
iterate with the smallest KKT residual is returned, so a cycling active set cannot make the
answer worse than its best visit.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dual_cone_project", "simplex_qp"]


def dual_cone_project(u: Tensor, gram: Tensor, iters: int = 20) -> Tensor:
    """Solve ``min_v ½ vᵀ G v  s.t.  v ≥ u`` for each row ``u`` of ``u`` (``B×K``).

    With ``G = J Jᵀ`` positive definite, ``Jᵀv`` is the projection of ``Jᵀu`` onto the dual cone
    of the rows of ``J`` (Jacobian descent, Quinton & Rey 2024, Prop. 1). KKT: ``Gv = λ ≥ 0``,
    ``v ≥ u``, ``λ ⊙ (v − u) = 0``. Returns ``v`` (``B×K``).
    """
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    v = u
    lam = v @ gram
    best = v
    best_res = torch.minimum(v - u, lam).square().sum(-1)
    tight = lam > 0
    for _ in range(iters):
        a = tight.to(gram.dtype)[..., None]
        m = a * eye + (1.0 - a) * gram  # tight rows: v_i = u_i; free rows: (Gv)_i = 0
        v = torch.linalg.solve_ex(m, (tight * u)[..., None])[0][..., 0]
        lam = v @ gram
        res = torch.minimum(v - u, lam).square().sum(-1)
        better = res < best_res
        best = torch.where(better[..., None], v, best)
        best_res = torch.where(better, res, best_res)
        tight = (lam - (v - u)) > 0
    return best


def simplex_qp(
    q_mat: Tensor, q_vec: Tensor, mask: Tensor, iters: int = 20, w0: Tensor | None = None
) -> Tensor:
    """Solve ``min_w ½ wᵀ Q w + qᵀ w`` over the simplex of the tasks where ``mask`` is 1.

    ``Q`` (``K×K``) positive definite on the masked tasks, ``q`` (``K,``), ``mask`` (``K,``, 0/1
    floats with at least one 1). KKT: ``Qw + q − μ1 = λ ≥ 0``, ``w ≥ 0``, ``λ ⊙ w = 0``,
    ``1ᵀw = 1``. Returns ``w`` (``K,``) on the simplex, 0 outside the mask.
    """
    k = q_mat.shape[0]
    dtype, device = q_mat.dtype, q_mat.device
    eye = torch.eye(k, dtype=dtype, device=device)
    ones = torch.ones(k, dtype=dtype, device=device)
    off = mask <= 0
    inf = torch.full_like(q_vec, float("inf"))
    zero_at = off if w0 is None else off | (w0 <= 0)
    best = mask / mask.sum()
    best_res = torch.full((), float("inf"), dtype=dtype, device=device)
    for _ in range(iters):
        z = zero_at.to(dtype)
        free = 1.0 - z
        top = torch.cat([z[:, None] * eye + free[:, None] * q_mat, -free[:, None]], dim=1)
        bottom = torch.cat([ones, torch.zeros(1, dtype=dtype, device=device)])[None, :]
        m = torch.cat([top, bottom], dim=0)
        rhs = torch.cat([-free * q_vec, torch.ones(1, dtype=dtype, device=device)])
        x = torch.linalg.solve_ex(m, rhs[:, None])[0][:, 0]
        w, mu = x[:k] * mask, x[k]
        lam = q_mat @ w + q_vec - mu
        res = torch.where(off, 0.0, torch.minimum(w, lam)).square().sum()
        better = res < best_res
        best = torch.where(better, w, best)
        best_res = torch.where(better, res, best_res)
        score = torch.where(off, inf, lam - w)
        zero_at = off | (score > 0)
        # keep at least one task free: the one with the smallest score
        keep = torch.nn.functional.one_hot(torch.argmin(score), k).to(torch.bool)
        zero_at = torch.where((zero_at | off).all(), zero_at & ~keep, zero_at)
    best = best.clamp_min(0.0) * mask
    return best / best.sum().clamp_min(torch.finfo(dtype).tiny)
