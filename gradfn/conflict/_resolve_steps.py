"""One iteration of GCond's resolution in coefficient space: pick the most conflicting pair, then
update the coefficients by the smooth rule or the three zones (formulas in
:mod:`gradfn.conflict._resolve`)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["_Consts", "_angle", "_loop"]


def _angle(c: Tensor, t: tuple[float, float, float], p: float, eps: float) -> Tensor:
    """The smooth rule's effective conflict angle ``α(c)`` (module docstring).

    Clamping ``c`` to ``[−1, 1]`` changes nothing here: above 1 the weak-zone
    ``u`` is clamped anyway, below −1 lies in the critical zone.
    """
    t_c, t_m, t_w = t
    half_pi = math.pi / 2
    shifted = c - t_m
    a_weak = half_pi - half_pi * torch.clamp(shifted * (1.0 / (t_w - t_m + eps)), 0.0, 1.0)
    a_main = half_pi + half_pi * torch.clamp(shifted * (1.0 / (t_c - t_m + eps)), min=0.0) ** p
    return torch.where(c >= t_m, a_weak, torch.where(c > t_c, a_main, math.pi))


class _Consts(NamedTuple):
    """Loop-invariant tensors of one resolution (built once per call).

    Pair tables are indexed by the flat position ``f = i·K + j`` of the picked Gramian entry
    (``f = 0``, the pair ``(0, 0)``, when nothing is valid) and, for the winner-ordered ones, by
    ``2f + [j wins]``. One-hot rows are kept (not plain indexing) so that the products with them
    propagate non-finite entries exactly as the vector-matrix products they replace.
    """

    k: int
    eye: Tensor
    upper: Tensor
    inf: Tensor
    zero: Tensor
    pi: Tensor
    oh_ij: Tensor  # (K², 2, K): [e_i; e_j]
    ij: Tensor  # (K², 2) int64: (i, j)
    oh_lw: Tensor  # (2K², 2, K): [e_loser; e_winner]
    oh_wl_t: Tensor  # (2K², K, 2): columns e_winner, e_loser
    winner: Tensor  # (2K²,) int64
    scale: Tensor  # (2,): the weak and main zones' 1/(t_w − t_m + eps), 1/(t_c − t_m + eps)
    lo: Tensor  # (2,): their clamp bounds
    hi: Tensor
    half_pm: Tensor  # (2,): (−π/2, π/2)
    sin_hi: Tensor  # (2,): (inf, π/2), the bounds of the angles whose sines are taken
    floor_sq: float
    eps: float
    t: tuple[float, float, float]

    @staticmethod
    def of(
        k: int,
        dtype: torch.dtype,
        device: torch.device,
        floor: float,
        eps: float,
        t: tuple[float, float, float],
    ) -> _Consts:
        eye = torch.eye(k, dtype=dtype, device=device)
        ar = torch.arange(k, device=device)
        i, j = ar.repeat_interleave(k), ar.repeat(k)
        ij = torch.stack([i, j], dim=1)
        oh_ij = torch.stack([eye[i], eye[j]], dim=1)
        # index 2f + s: s = 0 → i wins, s = 1 → j wins
        win = torch.stack([i, j], dim=1).reshape(-1)
        lose = torch.stack([j, i], dim=1).reshape(-1)
        oh_lw = torch.stack([eye[lose], eye[win]], dim=1)
        half_pi = math.pi / 2
        vec = lambda *x: torch.tensor(x, dtype=dtype, device=device)
        t_c, t_m, t_w = t
        return _Consts(
            k=k,
            eye=eye,
            upper=torch.ones(k, k, dtype=torch.bool, device=device).triu(1),
            inf=torch.full((k, k), math.inf, dtype=dtype, device=device),
            zero=torch.zeros((), dtype=dtype, device=device),
            pi=torch.full((), math.pi, dtype=dtype, device=device),
            oh_ij=oh_ij,
            ij=ij,
            oh_lw=oh_lw,
            oh_wl_t=oh_lw.flip(1).transpose(1, 2).contiguous(),
            winner=win,
            scale=vec(1.0 / (t_w - t_m + eps), 1.0 / (t_c - t_m + eps)),
            lo=vec(0.0, 0.0),
            hi=vec(1.0, math.inf),
            half_pm=vec(-half_pi, half_pi),
            sin_hi=vec(math.inf, half_pi),
            floor_sq=floor * floor,
            eps=eps,
            t=t,
        )


class _Pick(NamedTuple):
    """The pair an iteration treats: flat index ``f``, one-hots ``[e_i; e_j]`` (2, K), cosine
    ``c`` (0 when inactive), ``active``, the diagonal ``sq`` and the norms."""

    flat: Tensor  # (1,) int64
    oh: Tensor
    c: Tensor  # (1,)
    low: Tensor
    active: Tensor  # (1,) bool
    sq: Tensor
    norms: Tensor


def _pick(cur: Tensor, c_: _Consts) -> _Pick:
    """The valid pair ``(i < j)`` of lowest cosine in the current Gramian (ties: the earliest
    pair, row-major); ``active`` is False when no cosine is below the weak threshold."""
    sq = torch.diagonal(cur)
    norms = torch.sqrt(torch.clamp(sq, min=0.0))
    valid = sq >= c_.floor_sq
    mask = valid[:, None] & valid & c_.upper
    masked = torch.where(mask, cur / (norms[:, None] * norms + c_.eps), c_.inf)
    # the first of equal minima, as argmin; (1,)-shaped so that tables are indexed without a sync
    low, flat = masked.reshape(-1).min(dim=0, keepdim=True)
    active = low < c_.t[2]
    c = torch.where(active, low, c_.zero)  # keep inactive arithmetic finite
    return _Pick(flat, c_.oh_ij[flat].reshape(2, c_.k), c, low, active, sq, norms)


def _angle_sines(c: Tensor, power: float, c_: _Consts) -> Tensor:
    """``(sin α, sin min(α, π/2))`` of :func:`_angle`, the two zones' ramps computed together
    (the same elementwise operations on a pair of values)."""
    t_c, t_m, _ = c_.t
    u = torch.clamp((c - t_m) * c_.scale, c_.lo, c_.hi)  # (weak ramp, main ramp)
    u = torch.where(c_.hi < math.inf, u, u**power)  # the main ramp is raised to p
    a_weak, a_main = (math.pi / 2 + c_.half_pm * u).unbind()  # π/2 − π/2·u_w, π/2 + π/2·u_m^p
    alpha = torch.where(c >= t_m, a_weak, torch.where(c > t_c, a_main, c_.pi))
    return torch.sin(torch.clamp(alpha.expand(2), max=c_.sin_hi))


def _loop(
    gram: Tensor,
    c_: _Consts,
    max_iters: int,
    *,
    rule: str,
    power: float,
    ema_eps: Tensor,
    prev: tuple[Tensor, Tensor] | None,
    history: Tensor,
    weights: tuple[float, float],
    dominance: str,
    arbitrate_weak: bool,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """The resolution's iterations. Returns the coefficients, the resolved Gramian, the history
    and, per iteration, the flat pair index, ``active``, the winner and ``arbitrated``."""
    eps, t_m = c_.eps, c_.t[1]
    w_stab, w_str = weights
    coeff, cur = c_.eye, gram
    flats, actives, won, arbitrations = [], [], [], []
    for _ in range(max_iters):
        p = _pick(cur, c_)
        rows = p.oh @ cur  # [e_i; e_j]ᵀ-products: rows i and j of the Gramian
        rel = p.norms / ema_eps
        # n_i, n_j; rel_i, rel_j; d = e_iᵀ cur e_j — each a product with a one-hot, as before
        (n_i, n_j), (rel_i, rel_j), (_, d) = (torch.stack([p.sq, rel, rows[0]]) @ p.oh.T).unbind()
        score = w_str * rel / (rel_i + rel_j + eps)
        if prev is not None:
            stab = (coeff * prev[0]).sum(dim=1) / (p.norms * prev[1] + eps)
            score = score + w_stab * torch.clamp(stab, min=0.0)
        s_i, s_j = torch.mv(p.oh, score).unbind()
        j_wins = s_j > s_i  # strict: ties go to i
        if history.numel():
            dom_i, dom_j = (history == c_.ij[p.flat].T).all(dim=1).unbind()
            # exactly one of the pair dominant: "loses" makes it lose, "wins" makes it win
            j_wins = torch.where(dom_i == dom_j, j_wins, dom_i if dominance == "loses" else dom_j)
        side = 2 * p.flat + j_wins
        winner = c_.winner[side]
        oh_lw = c_.oh_lw[side].reshape(2, c_.k)  # [e_l; e_w]
        if rule == "smooth":
            sines = _angle_sines(p.c, power, c_)  # (sin α, sin min(α, π/2))
            # (a, b): g_w −= a g_l, g_l −= b g_w
            ab = torch.where(p.active, sines * d / (torch.mv(oh_lw, p.sq) + eps), c_.zero)
            upd = c_.oh_wl_t[side].reshape(c_.k, 2) @ (ab[:, None] * (oh_lw @ coeff))
            coeff = coeff - upd
            arbitrated = p.active if arbitrate_weak else p.active & (p.c < t_m)
        else:
            coeff, arbitrated = _zones_step(coeff, p, oh_lw, n_i, n_j, d, c_)
        cur = coeff @ gram @ coeff.T
        if history.numel():
            shifted = torch.cat([history[1:], winner.reshape(1)])
            history = torch.where(arbitrated, shifted, history)
        flats.append(p.flat)
        actives.append(p.active)
        won.append(winner)
        arbitrations.append(arbitrated)
    return coeff, cur, history, flats, actives, won, arbitrations


def _zones_step(
    coeff: Tensor, p: _Pick, oh_lw: Tensor, n_i: Tensor, n_j: Tensor, d: Tensor, c_: _Consts
) -> tuple[Tensor, Tensor]:
    """The three zones: critical zeroes the loser, main projects the loser off the winner, weak
    projects both symmetrically (no arbitration). Returns ``(coefficients, arbitrated)``."""
    eps, zero = c_.eps, c_.zero
    t_c, t_m, _ = c_.t
    c = p.c
    oh_l = oh_lw[0]
    oh_i, oh_j = p.oh.unbind()
    n_w = torch.mv(oh_lw, p.sq)[1]
    row_l, row_w = (oh_lw @ coeff).unbind()
    crit = p.active & (c < t_c)
    main = p.active & (c >= t_c) & (c < t_m)
    weak = p.active & (c >= t_m)
    row_i, row_j = (p.oh @ coeff).unbind()
    d_tilde = c * torch.sqrt(torch.clamp(n_i * n_j, min=0.0))
    b_main = torch.where(main, d / (n_w + eps), zero)  # g_l -= b_main g_w
    a_ij = torch.where(weak, d_tilde / (n_j + eps), zero)  # g_i -= a_ij g_j
    a_ji = torch.where(weak, d_tilde / (n_i + eps), zero)  # g_j -= a_ji g_i
    kill = crit.to(coeff.dtype)  # critical: zero the loser's row
    coeff = (
        coeff
        - torch.outer(oh_l, kill * row_l + b_main * row_w)
        - torch.outer(oh_i, a_ij * row_j)
        - torch.outer(oh_j, a_ji * row_i)
    )
    return coeff, crit | main
