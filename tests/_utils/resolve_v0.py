"""Frozen copy of GCond's K-space resolution (``resolve_gramian``) before its op-count refactor.

The oracle for the refactor of :func:`gradfn.conflict.resolve_gramian`: the code of
``gradfn/conflict/_resolve.py``, ``_resolve_steps.py`` and ``push_history`` of ``_arbitrator.py``
as they were, copied verbatim into one module (only the imports and this docstring differ). The
new implementation must return bit-identical outputs (``tests/unit/conflict/test_resolve_frozen.py``).
Do not edit it to follow later changes of the library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from gradfn.typing import PyTree

DominanceRule = Literal["loses", "wins"]
Rule = Literal["smooth", "zones"]


def push_history(history: Tensor, winner: Tensor, record: Tensor) -> Tensor:
    """Append ``winner`` (dropping the oldest entry) where the 0-d bool ``record`` holds."""
    if history.numel() == 0:
        return history
    shifted = torch.cat([history[1:], winner.reshape(1).to(history.dtype)])
    return torch.where(record, shifted, history)


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


class ResolveResult(NamedTuple):
    """Output of :func:`resolve_gramian` / :func:`resolve` (``T`` = iterations run).

    * ``coefficients`` (K, K): resolved ``g_i = Σ_j C_ij g⁰_j``.
    * ``weights`` (K,): ``C.sum(0)``, so ``Σ_i g_i = Σ_j weights_j g⁰_j``.
    * ``gramian`` (K, K): ``C G⁰ Cᵀ``, the Gramian of the resolved gradients.
    * ``min_cosine_before`` / ``min_cosine_after``: true minimum pairwise cosine over the pairs whose
      norms pass the floor, before / after resolution (1.0 when there is no such pair).
    * ``iterations``: 0-d int64, iterations that resolved a pair (the reference's ``proj_iters``).
    * ``pairs`` (T, 2) int64: the pair treated at each iteration, ``-1`` for a no-op iteration.
    * ``winners`` (T,) int64: the arbitrated winner, ``-1`` where nobody was arbitrated.
    * ``history`` (W,) int64: the updated winner ring.
    * ``grads``: the resolved task-stacked gradients (:func:`resolve` only, else ``None``).
    """

    coefficients: Tensor
    weights: Tensor
    gramian: Tensor
    min_cosine_before: Tensor
    min_cosine_after: Tensor
    iterations: Tensor
    pairs: Tensor
    winners: Tensor
    history: Tensor
    grads: PyTree | None = None


def check_thresholds(thresholds: Sequence[float], name: str = "thresholds") -> tuple[float, ...]:
    """Validate ``(critical, main, weak)``: three numbers in [-1, 1], non-decreasing."""
    try:
        t = tuple(float(x) for x in thresholds)
    except TypeError as err:
        raise TypeError(f"`{name}` must be a sequence of 3 numbers, got {thresholds!r}") from err
    if len(t) != 3:
        raise ValueError(f"`{name}` must hold 3 numbers (critical, main, weak), got {thresholds!r}")
    if any(not -1.0 <= x <= 1.0 for x in t):
        raise ValueError(f"`{name}` must lie in [-1, 1], got {thresholds!r}")
    if not t[0] <= t[1] <= t[2]:
        raise ValueError(f"`{name}` must be non-decreasing (critical <= main <= weak), got {t!r}")
    return t


def pair_cosines(gram: Tensor, eps: float, norm_floor: float) -> tuple[Tensor, Tensor]:
    """Cosines ``G_ij / (||g_i||·||g_j|| + eps)`` (K×K) and the mask of pairs ``i < j`` whose
    norms are both ``>= norm_floor``."""
    k = gram.shape[0]
    sq = torch.diagonal(gram)
    norms = torch.sqrt(torch.clamp(sq, min=0.0))
    cos = gram / (norms[:, None] * norms[None, :] + eps)
    valid = sq >= norm_floor * norm_floor
    upper = torch.ones(k, k, dtype=torch.bool, device=gram.device).triu(1)
    return cos, upper & valid[:, None] & valid[None, :]


def true_min_cosine(gram: Tensor, eps: float = 1e-8, norm_floor: float | None = None) -> Tensor:
    """Minimum pairwise cosine over the valid pairs of a Gramian (1.0 if there is none)."""
    cos, mask = pair_cosines(gram, eps, eps if norm_floor is None else norm_floor)
    one = torch.ones((), dtype=gram.dtype, device=gram.device)
    return torch.where(mask, cos, one).amin() if gram.shape[0] > 1 else one


def resolve_gramian(
    gram: Tensor,
    thresholds: Sequence[float] = (-0.8, -0.5, 0.0),
    *,
    rule: Rule = "smooth",
    max_iters: int | None = None,
    remap_power: float = 2.0,
    eps: float = 1e-8,
    norm_floor: float | None = None,
    norm_ema: Tensor | None = None,
    prev_cross: Tensor | None = None,
    prev_sq_norms: Tensor | None = None,
    history: Tensor | None = None,
    tie_breaking_weights: Sequence[float] = (0.8, 0.2),
    dominance: DominanceRule = "loses",
    arbitrate_weak: bool = False,
) -> ResolveResult:
    """Resolve the conflicts of the gradients whose Gramian is ``gram`` (K×K).

    Args:
        gram: ``G⁰_ij = <g⁰_i, g⁰_j>`` (float32 or float64; the work is done in this dtype).
        thresholds: ``(critical, main, weak)``, non-decreasing, in [-1, 1].
        rule: ``"smooth"`` or ``"zones"`` (module docstring).
        max_iters: iterations ``T`` (``None`` → ``2K``, the reference's default; ``0`` → none).
        remap_power: ``p`` of the smooth rule's main-zone remap.
        eps: the reference's ``eps`` (cosine and projection denominators).
        norm_floor: pairs with a gradient of norm ``< norm_floor`` are skipped. ``None`` → ``eps``
            (a test on the norm); the reference tests the *squared* norm against ``eps``, i.e.
            ``norm_floor = sqrt(eps)``.
        norm_ema: the tasks' norm EMAs ``e_k`` (K,) for the arbitrator's strength (default ones).
        prev_cross: ``X_mk = <g⁰_m, p_k>`` (K×K) with the previous-step gradients ``p_k``, and
        prev_sq_norms: ``||p_k||²`` (K,); both ``None`` → stability 0 (as on the first step).
        history: winner ring ``(W,)`` int64 (see :func:`gradfn.conflict.push_history`); ``None`` → no rotation.
        tie_breaking_weights: ``(w_stability, w_strength)``.
        dominance: ``"loses"`` (the reference: a dominant task is forced to lose) or ``"wins"``.
        arbitrate_weak: smooth rule only — also arbitrate (and record in the history) weak-zone pairs,
            as the reference does; the winner does not change a weak-zone projection, so the default
            ``False`` only keeps those pairs out of the history.

    Returns:
        :class:`ResolveResult` (``grads`` is ``None``).
    """
    if not isinstance(gram, Tensor) or gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(
            f"resolve_gramian: `gram` must be a square (K, K) tensor, got {gram!r:.80}"
        )
    t = check_thresholds(thresholds)
    if rule not in ("smooth", "zones"):
        raise ValueError(f"resolve_gramian: `rule` must be 'smooth' or 'zones', got {rule!r}")
    if dominance not in ("loses", "wins"):
        raise ValueError(
            f"resolve_gramian: `dominance` must be 'loses' or 'wins', got {dominance!r}"
        )
    if not remap_power > 0:
        raise ValueError(f"resolve_gramian: `remap_power` must be > 0, got {remap_power!r}")
    w = tuple(float(x) for x in tie_breaking_weights)
    if len(w) != 2:
        raise ValueError(f"resolve_gramian: `tie_breaking_weights` must hold 2 numbers, got {w!r}")
    if (prev_cross is None) != (prev_sq_norms is None):
        raise ValueError("resolve_gramian: give both `prev_cross` and `prev_sq_norms`, or neither")
    k = gram.shape[0]
    if max_iters is None:
        max_iters = 2 * k
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 0:
        raise ValueError(f"resolve_gramian: `max_iters` must be an int >= 0, got {max_iters!r}")
    floor = eps if norm_floor is None else float(norm_floor)

    dtype, device = gram.dtype, gram.device
    ema = torch.ones(k, dtype=dtype, device=device) if norm_ema is None else norm_ema.to(dtype)
    if history is None:
        history = torch.empty(0, dtype=torch.int64, device=device)
    if prev_cross is not None:
        prev_cross = prev_cross.to(dtype)
        prev_sq_norms = prev_sq_norms.to(dtype)  # type: ignore[union-attr]
    c_ = _Consts.of(k, dtype, device, floor, eps, (t[0], t[1], t[2]))
    minus_one = torch.full((), -1, dtype=torch.int64, device=device)

    coeff = c_.eye
    cur = gram
    ema_eps = ema + eps  # the arbitrator's strength denominators, loop-invariant
    prev: tuple[Tensor, Tensor] | None = None  # X^T and the previous norms, loop-invariant
    if prev_cross is not None and prev_sq_norms is not None:
        prev = (prev_cross.T, torch.sqrt(torch.clamp(prev_sq_norms, min=0.0)))
    actives, ijs, won, arbitrations = [], [], [], []
    for _ in range(max_iters):
        pair = _pick_pair(cur, c_)
        stab = None  # cosine of each current gradient with its previous one (the stability)
        if prev is not None:
            stab = (coeff * prev[0]).sum(dim=1) / (pair.norms * prev[1] + eps)
        j_wins = _j_wins(pair, ema_eps, stab, history, (w[0], w[1]), dominance, eps)
        winner = torch.where(j_wins, pair.j, pair.i)
        if rule == "smooth":
            coeff = _smooth_step(coeff, pair, j_wins, remap_power, c_)
            arbitrated = pair.active if arbitrate_weak else pair.active & (pair.c < c_.t[1])
        else:
            coeff, arbitrated = _zones_step(coeff, pair, j_wins, c_)
        cur = coeff @ gram @ coeff.T
        history = push_history(history, winner, arbitrated)
        actives.append(pair.active)
        ijs.append(pair.ij)
        won.append(winner)
        arbitrations.append(arbitrated)

    if max_iters:
        active = torch.stack(actives)
        iterations = active.to(torch.int64).sum()
        pairs = torch.where(active[:, None], torch.stack(ijs), minus_one)
        winners = torch.where(torch.stack(arbitrations), torch.stack(won), minus_one)
    else:
        iterations = torch.zeros((), dtype=torch.int64, device=device)
        pairs = torch.empty(0, 2, dtype=torch.int64, device=device)
        winners = torch.empty(0, dtype=torch.int64, device=device)
    return ResolveResult(
        coefficients=coeff,
        weights=coeff.sum(dim=0),
        gramian=cur,
        min_cosine_before=true_min_cosine(gram, eps, floor),
        min_cosine_after=true_min_cosine(cur, eps, floor),
        iterations=iterations,
        pairs=pairs,
        winners=winners,
        history=history,
    )
