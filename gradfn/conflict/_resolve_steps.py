"""One iteration of GCond's resolution in coefficient space: pick the most conflicting pair, then
update the coefficients by the smooth rule or the three zones (formulas in
:mod:`gradfn.conflict._resolve`)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "_Consts",
    "_Pair",
    "_angle",
    "_j_wins",
    "_pick_pair",
    "_smooth_step",
    "_zones_step",
]


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
    """Loop-invariant tensors of one resolution (built once per call)."""

    k: int
    eye: Tensor
    ar: Tensor
    upper: Tensor
    inf: Tensor
    zero: Tensor
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
        return _Consts(
            k=k,
            eye=torch.eye(k, dtype=dtype, device=device),
            ar=torch.arange(k, device=device),
            upper=torch.ones(k, k, dtype=torch.bool, device=device).triu(1),
            inf=torch.full((k, k), math.inf, dtype=dtype, device=device),
            zero=torch.zeros((), dtype=dtype, device=device),
            floor_sq=floor * floor,
            eps=eps,
            t=t,
        )


class _Pair(NamedTuple):
    """The pair an iteration treats: indices, one-hots, cosine ``c``, dot ``d``, squared norms."""

    i: Tensor
    j: Tensor
    oh_i: Tensor
    oh_j: Tensor
    c: Tensor
    d: Tensor
    n_i: Tensor
    n_j: Tensor
    active: Tensor
    sq: Tensor
    norms: Tensor
    ij: Tensor  # (2,) int64: (i, j)


def _pick_pair(cur: Tensor, c_: _Consts) -> _Pair:
    """The valid pair ``(i < j)`` of lowest cosine in the current Gramian (ties: the earliest
    pair, row-major); ``active`` is False when no cosine is below the weak threshold."""
    k, eps = c_.k, c_.eps
    sq = torch.diagonal(cur)
    norms = torch.sqrt(torch.clamp(sq, min=0.0))
    valid = sq >= c_.floor_sq
    mask = c_.upper & valid[:, None] & valid[None, :]
    masked = torch.where(mask, cur / (torch.outer(norms, norms) + eps), c_.inf).reshape(-1)
    flat = torch.argmin(masked)
    low = masked.amin()
    active = low < c_.t[2]
    c = torch.where(active, low, c_.zero)  # keep inactive arithmetic finite
    i, j = flat // k, flat % k
    ij = torch.stack([i, j])
    oh_i, oh_j = c_.eye[ij].unbind()  # one-hot rows of the identity
    d = oh_i @ cur @ oh_j
    return _Pair(i, j, oh_i, oh_j, c, d, sq @ oh_i, sq @ oh_j, active, sq, norms, ij)


def _j_wins(
    pair: _Pair,
    ema_eps: Tensor,
    stab: Tensor | None,
    history: Tensor,
    weights: tuple[float, float],
    dominance: str,
    eps: float,
) -> Tensor:
    """0-d bool: does ``j`` win? :func:`gradfn.conflict.second_wins` for a picked pair, with the
    loop-invariant ``norm_ema + eps`` given and the dominance read off the pair's indices."""
    w_stab, w_str = weights
    rel = pair.norms / ema_eps
    score = w_str * rel / (rel @ pair.oh_i + rel @ pair.oh_j + eps)
    if stab is not None:
        score = score + w_stab * torch.clamp(stab, min=0.0)
    j_wins = score @ pair.oh_j > score @ pair.oh_i  # strict: ties go to i
    if history.numel() == 0:
        return j_wins
    dom_i, dom_j = (history == pair.i).all(), (history == pair.j).all()
    # exactly one of the pair dominant: "loses" makes it lose, "wins" makes it win
    return torch.where(dom_i == dom_j, j_wins, dom_i if dominance == "loses" else dom_j)


def _smooth_step(coeff: Tensor, pair: _Pair, j_wins: Tensor, power: float, c_: _Consts) -> Tensor:
    """The smooth rule: ``g_w −= sin α · d/(‖g_l‖²+eps) · g_l`` and
    ``g_l −= sin min(α, π/2) · d/(‖g_w‖²+eps) · g_w``, simultaneously."""
    eps, zero = c_.eps, c_.zero
    oh_w, oh_l = (
        torch.where(j_wins, pair.oh_j, pair.oh_i),
        torch.where(j_wins, pair.oh_i, pair.oh_j),
    )
    n_w, n_l = torch.where(j_wins, pair.n_j, pair.n_i), torch.where(j_wins, pair.n_i, pair.n_j)
    row_w, row_l = oh_w @ coeff, oh_l @ coeff
    alpha = _angle(pair.c, c_.t, power, eps)
    s_w = torch.sin(alpha)
    s_l = torch.sin(torch.clamp(alpha, max=math.pi / 2))
    a = torch.where(pair.active, s_w * pair.d / (n_l + eps), zero)  # g_w -= a g_l
    b = torch.where(pair.active, s_l * pair.d / (n_w + eps), zero)  # g_l -= b g_w
    return coeff - torch.outer(oh_w, a * row_l) - torch.outer(oh_l, b * row_w)


def _zones_step(coeff: Tensor, pair: _Pair, j_wins: Tensor, c_: _Consts) -> tuple[Tensor, Tensor]:
    """The three zones: critical zeroes the loser, main projects the loser off the winner, weak
    projects both symmetrically (no arbitration). Returns ``(coefficients, arbitrated)``."""
    eps, zero = c_.eps, c_.zero
    t_c, t_m, _ = c_.t
    c, d, n_i, n_j = pair.c, pair.d, pair.n_i, pair.n_j
    oh_w, oh_l = (
        torch.where(j_wins, pair.oh_j, pair.oh_i),
        torch.where(j_wins, pair.oh_i, pair.oh_j),
    )
    n_w = torch.where(j_wins, n_j, n_i)
    row_w, row_l = oh_w @ coeff, oh_l @ coeff
    crit = pair.active & (c < t_c)
    main = pair.active & (c >= t_c) & (c < t_m)
    weak = pair.active & (c >= t_m)
    row_i, row_j = pair.oh_i @ coeff, pair.oh_j @ coeff
    d_tilde = c * torch.sqrt(torch.clamp(n_i * n_j, min=0.0))
    b_main = torch.where(main, d / (n_w + eps), zero)  # g_l -= b_main g_w
    a_ij = torch.where(weak, d_tilde / (n_j + eps), zero)  # g_i -= a_ij g_j
    a_ji = torch.where(weak, d_tilde / (n_i + eps), zero)  # g_j -= a_ji g_i
    kill = crit.to(coeff.dtype)  # critical: zero the loser's row
    coeff = (
        coeff
        - torch.outer(oh_l, kill * row_l + b_main * row_w)
        - torch.outer(pair.oh_i, a_ij * row_j)
        - torch.outer(pair.oh_j, a_ji * row_i)
    )
    return coeff, crit | main
