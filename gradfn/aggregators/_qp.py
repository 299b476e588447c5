"""Fixed-iteration tensor QP solvers on ``K×K`` problems (no host syncs, no data-dependent
Python branches), so every method built on them compiles with ``fullgraph=True``.

Both problems are reduced to a linear complementarity problem ``LCP(M, q)``: find ``x ≥ 0``
with ``w = M x + q ≥ 0`` and ``xᵀw = 0``, for a positive-definite ``M``. It is solved by Júdice &
Pires' block principal pivoting (1994): guess the free set ``F`` (``w_F = 0``) and the tight set
(``x = 0``), solve ``M_FF x_F = −q_F`` with ``torch.linalg.solve_ex`` (one masked ``K×K`` system),
flip every infeasible index while that reduces the number of infeasibilities, and fall back to
Murty's single-index pivot after ``block_fails`` non-improving block steps. For a P-matrix (any
positive-definite ``M``) this reaches the exact solution in finitely many steps — typically a
few — and a solution, once found, is a fixed point. The iterate with the smallest
complementarity residual is returned. Eagerly on the CPU the loop stops at the first iterate
with no infeasible index (the same result, read back for free); compiled or on an accelerator
it always runs ``iters`` iterations without a host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradfn._internal.compat import is_compiling as _is_compiling

__all__ = ["dual_cone_project", "lcp", "simplex_qp"]


def lcp(m: Tensor, q: Tensor, iters: int = 30, block_fails: int = 3) -> Tensor:
    """Solve ``LCP(M, q)`` for each row of ``q`` (``B×K``, or ``K``); ``M`` (``K×K``) PD."""
    squeeze = q.dim() == 1
    q = q[None, :] if squeeze else q
    # Eagerly on the CPU, reading a flag back costs nothing: stop as soon as every row is solved.
    # Elsewhere (compiling, accelerators) the loop keeps its fixed length and never syncs.
    early_exit = q.device.type == "cpu" and not _is_compiling()
    k = m.shape[0]
    ntol = -1e-12 * (q.abs().amax(-1, keepdim=True) + torch.diagonal(m).abs().max())
    # iterate 0: nothing free, x = 0 and w = q (no solve needed)
    x = torch.zeros_like(q)
    infeasible = q < ntol
    if early_exit and not bool(infeasible.any()):
        return x[0] if squeeze else x
    eye = torch.eye(k, dtype=m.dtype, device=m.device)
    idx = torch.arange(1, k + 1, device=m.device)
    nq = -q
    mt = m.mT
    xs = [x]  # eager: the iterates, to pick the best one only if the loop runs out
    if not early_exit:
        best = x
        best_res = torch.minimum(x, q).square().sum(-1)
    # the first pivot always improves on "K + 1 infeasible": every infeasible index turns free
    free = infeasible
    ninf_best = infeasible.sum(-1)
    budget = torch.full(q.shape[:1], block_fails, dtype=torch.int64, device=m.device)
    for it in range(iters - 1):  # iterate 0 above counts as one
        if it > 0:
            # pivot: flip every infeasible index while that keeps reducing their number, else
            # Murty's single largest infeasible index
            ninf = infeasible.sum(-1)
            improved = ninf < ninf_best
            block = improved | (budget > 0)
            budget = torch.where(improved, block_fails, (budget - 1).clamp_min(0))
            ninf_best = torch.minimum(ninf_best, ninf)
            ranked = infeasible * idx
            single = (ranked == ranked.amax(-1, keepdim=True)) & infeasible  # the largest one
            free = free ^ torch.where(block[:, None], infeasible, single)
        # free rows: (Mx)_i = -q_i; tight rows: x_i = 0
        system = torch.where(free[..., None], m, eye)
        x = torch.linalg.solve_ex(system, (nq * free)[..., None])[0][..., 0]
        w = x @ mt + q
        infeasible = torch.where(free, x, w) < ntol
        if early_exit:
            if not bool(infeasible.any()):
                break  # every row solved: the solution is a fixed point of the pivoting
            xs.append(x)
        else:
            res = torch.minimum(x, w).square().sum(-1)
            better = res < best_res
            best = torch.where(better[:, None], x, best)
            best_res = torch.where(better, res, best_res)
    else:  # no early exit: the iterate with the smallest complementarity residual
        if early_exit:
            cand = torch.stack(xs)  # (T, B, K)
            res = torch.minimum(cand, cand @ mt + q).square().sum(-1)  # (T, B)
            pick = torch.argmin(res, dim=0)  # the first minimiser, as a strict `<` keeps
            x = cand.gather(0, pick[None, :, None].expand(1, *q.shape))[0]
        else:
            x = best
    return x[0] if squeeze else x


def dual_cone_project(u: Tensor, gram: Tensor, iters: int = 30) -> Tensor:
    """Solve ``min_v ½ vᵀ G v  s.t.  v ≥ u`` for each row ``u`` of ``u`` (``B×K``).

    With ``G = J Jᵀ`` positive definite, ``Jᵀv`` is the projection of ``Jᵀu`` onto the dual cone
    of the rows of ``J`` (Jacobian descent, Quinton & Rey 2024, Prop. 1). With ``x = v − u``:
    ``LCP(G, G u)``. Returns ``v`` (``B×K``).
    """
    return u + lcp(gram, u @ gram, iters)


def simplex_qp(q_mat: Tensor, q_vec: Tensor | None, mask: Tensor | None, iters: int = 30) -> Tensor:
    """Solve ``min_w ½ wᵀ Q w + qᵀ w`` over the simplex of the tasks where ``mask`` is 1.

    ``Q`` (``K×K``) positive definite on the masked tasks, ``q`` (``K,``; None: 0), ``mask``
    (``K,``, 0/1 floats with at least one 1; None: every task). On the simplex
    ``qᵀw = wᵀ(q1ᵀ + 1qᵀ)w/2`` and ``wᵀ11ᵀw = 1``, so the objective equals ``½ wᵀ Q' w − c/2``
    with ``Q' = Q + q1ᵀ + 1qᵀ + c 11ᵀ``, positive definite for ``c > qᵀQ⁻¹q``. The
    minimum-``Q'``-norm point of the simplex is ``x/1ᵀx`` with ``x`` the solution of
    ``LCP(Q', −1)`` (its KKT conditions divided by ``1ᵀx``). Returns ``w`` (``K,``) on the
    simplex, 0 outside the mask.
    """
    k = q_mat.shape[0]
    if mask is None and q_vec is None:  # every task, q = 0: Q' = Q + (κ + 1)·11ᵀ, κ = tr(Q)/K
        qp = q_mat + (torch.diagonal(q_mat).sum() / k + 1.0)
        x = lcp(
            0.5 * (qp + qp.mT),
            torch.full((k,), -1.0, dtype=q_mat.dtype, device=q_mat.device),
            iters,
        )
        x = x.clamp_min(0.0)
        return x / x.sum().clamp_min(torch.finfo(x.dtype).tiny)
    if mask is None:
        mask = torch.ones(k, dtype=q_mat.dtype, device=q_mat.device)
    eye = torch.eye(k, dtype=q_mat.dtype, device=q_mat.device)
    both = mask[:, None] * mask
    # wᵀ11ᵀw = 1 on the simplex: adding κ11ᵀ keeps the minimiser and makes Q definite along
    # directions with 1ᵀd ≠ 0 (e.g. the null direction w of a Newton Hessian)
    kappa = torch.diagonal(q_mat * both).sum() / mask.sum()
    if q_vec is None:  # q = 0: c = 1
        qp = (q_mat + (kappa + 1.0)) * both + (1.0 - both) * eye
    else:
        qm = (q_mat + kappa) * both + (1.0 - both) * eye
        qv = q_vec * mask
        c = 2.0 * (qv @ torch.linalg.solve_ex(qm, qv[:, None])[0][:, 0]).clamp_min(0.0) + 1.0
        ones = mask
        qp = qm + (torch.outer(qv, ones) + torch.outer(ones, qv) + c * torch.outer(ones, ones))
        qp = qp * both + (1.0 - both) * eye
    qp = 0.5 * (qp + qp.mT)
    x = lcp(qp, torch.where(mask > 0, -1.0, 1.0).to(q_mat.dtype), iters)
    x = x.clamp_min(0.0) * mask
    return x / x.sum().clamp_min(torch.finfo(x.dtype).tiny)
