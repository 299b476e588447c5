"""GCond conflict resolution (arXiv:2509.07252) in K×K coefficient space.

GCond repeatedly picks the most conflicting pair of task gradients (lowest cosine below the *weak*
threshold) and projects them against each other. Every projection is linear in the task gradients,
so the whole procedure can be tracked by a coefficient matrix ``C`` (K×K) with

    g_i = Σ_j C_ij g⁰_j,        <g_i, g_j> = (C G⁰ Cᵀ)_ij,        G⁰ = Gramian of the g⁰.

One resolution step therefore costs O(K²·n) for the Gramian plus O(iters·K³) scalar work, instead of
O(iters·K²·n) for the pairwise vector implementation; the resolved gradients are ``combine(C, g⁰)``
and their sum is ``weighted_sum(g⁰, C.sum(0))``.

Rules (``thresholds = (t_c, t_m, t_w)`` = (critical, main, weak), ``c`` the pair's cosine):

* ``"smooth"`` (default): effective angle ``α(c)`` — weak zone ``c >= t_m``:
  ``α = (π/2)(1 − clamp((c−t_m)/(t_w−t_m+eps), 0, 1))``; main zone ``t_c < c < t_m``:
  ``α = π/2 + (π/2)·((c−t_m)/(t_c−t_m+eps))^p``; critical ``c <= t_c``: ``α = π``. With
  ``s_w = sin α``, ``s_l = sin(min(α, π/2))`` and ``d = <g_i, g_j>``, simultaneously
  ``g_w ← g_w − s_w·d/(||g_l||²+eps)·g_l`` and ``g_l ← g_l − s_l·d/(||g_w||²+eps)·g_w``.
* ``"zones"`` (the reference implementation's ``use_smooth_logic=False``): critical ``c < t_c``: the loser is
  zeroed; main ``t_c <= c < t_m``: ``g_l ← g_l − d/(||g_w||²+eps)·g_w``; weak ``t_m <= c < t_w``:
  symmetric projection with ``d̃ = c·||g_i||·||g_j||`` and no arbitration.

The loop runs a fixed number of iterations (``max_iters``, default ``2K``); an iteration that finds
no pair below the weak threshold changes nothing (the reference stops there), so the result equals the
reference's early exit. No ``.item()``, no Python branch on tensor values: it traces under
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from gradfn import tree
from gradfn._internal.checks import check_finite, check_nonnegative
from gradfn.conflict._arbitrator import DominanceRule
from gradfn.conflict._resolve_steps import _angle as _angle  # the smooth rule, tested alone
from gradfn.conflict._resolve_steps import _Consts, _loop
from gradfn.typing import PyTree

__all__ = [
    "ResolveResult",
    "Rule",
    "check_resolve_options",
    "check_thresholds",
    "cross_gramian",
    "gramian_and_cross",
    "pair_cosines",
    "resolve",
    "resolve_gramian",
    "true_min_cosine",
]

Rule = Literal["smooth", "zones"]


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


def check_resolve_options(
    fn: str,
    k: int,
    thresholds: Sequence[float],
    rule: str,
    dominance: str,
    eps: float,
    norm_floor: float | None,
    remap_power: float,
    tie_breaking_weights: Sequence[float],
    max_iters: int | None,
) -> tuple[tuple[float, ...], float, float, tuple[float, ...], int]:
    """The resolution's options checked (errors name ``fn`` and the argument): the thresholds,
    ``eps``, the norm floor (``eps`` when ``None``), the two tie-breaking weights and
    ``max_iters`` (``2K`` when ``None``)."""
    t = check_thresholds(thresholds)
    if rule not in ("smooth", "zones"):
        raise ValueError(f"{fn}: `rule` must be 'smooth' or 'zones', got {rule!r}")
    if dominance not in ("loses", "wins"):
        raise ValueError(f"{fn}: `dominance` must be 'loses' or 'wins', got {dominance!r}")
    eps = check_nonnegative("eps", eps)
    floor = eps if norm_floor is None else check_nonnegative("norm_floor", norm_floor)
    if not (check_finite("remap_power", remap_power) > 0):
        raise ValueError(f"{fn}: `remap_power` must be > 0, got {remap_power!r}")
    w = tuple(float(x) for x in tie_breaking_weights)
    if len(w) != 2:
        raise ValueError(f"{fn}: `tie_breaking_weights` must hold 2 numbers, got {w!r}")
    max_iters = 2 * k if max_iters is None else max_iters
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 0:
        raise ValueError(f"{fn}: `max_iters` must be an int >= 0, got {max_iters!r}")
    return t, eps, floor, w, max_iters


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
    eps = check_nonnegative("eps", eps)
    if norm_floor is not None:
        norm_floor = check_nonnegative("norm_floor", norm_floor)
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
    if (prev_cross is None) != (prev_sq_norms is None):
        raise ValueError("resolve_gramian: give both `prev_cross` and `prev_sq_norms`, or neither")
    k = gram.shape[0]
    t, eps, floor, w, max_iters = check_resolve_options(
        "resolve_gramian",
        k,
        thresholds,
        rule,
        dominance,
        eps,
        norm_floor,
        remap_power,
        tie_breaking_weights,
        max_iters,
    )

    dtype, device = gram.dtype, gram.device
    ema = torch.ones(k, dtype=dtype, device=device) if norm_ema is None else norm_ema.to(dtype)
    if history is None:
        history = torch.empty(0, dtype=torch.int64, device=device)
    if prev_cross is not None:
        prev_cross = prev_cross.to(dtype)
        prev_sq_norms = prev_sq_norms.to(dtype)  # type: ignore[union-attr]
    c_ = _Consts.of(k, dtype, device, floor, eps, (t[0], t[1], t[2]))
    minus_one = torch.full((), -1, dtype=torch.int64, device=device)

    ema_eps = ema + eps  # the arbitrator's strength denominators, loop-invariant
    prev: tuple[Tensor, Tensor] | None = None  # X^T and the previous norms, loop-invariant
    if prev_cross is not None and prev_sq_norms is not None:
        prev = (prev_cross.T, torch.sqrt(torch.clamp(prev_sq_norms, min=0.0)))
    coeff, cur, history, flats, actives, won, arbitrations = _loop(
        gram,
        c_,
        max_iters,
        rule=rule,
        power=remap_power,
        ema_eps=ema_eps,
        prev=prev,
        history=history,
        weights=(w[0], w[1]),
        dominance=dominance,
        arbitrate_weak=arbitrate_weak,
    )

    if max_iters:
        active = torch.cat(actives)
        iterations = active.to(torch.int64).sum()
        pairs = torch.where(active[:, None], c_.ij[torch.cat(flats)], minus_one)
        winners = torch.where(torch.cat(arbitrations), torch.cat(won), minus_one)
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


def resolve(
    grads: PyTree,
    thresholds: Sequence[float] = (-0.8, -0.5, 0.0),
    *,
    gram_dtype: torch.dtype = torch.float32,
    prev: PyTree | None = None,
    **kwargs: Any,
) -> ResolveResult:
    """Resolve the conflicts of task-stacked ``grads`` (leaves ``(K, ...)``).

    Computes the Gramian leaf by leaf (in ``gram_dtype``), runs :func:`resolve_gramian` (every keyword
    argument of which is accepted) and returns its result with ``grads`` = the resolved task-stacked
    gradients ``combine(C, grads)``. ``prev`` (task-stacked, optional) are the previous-step gradients
    for the arbitrator's stability; their cross-Gramian with ``grads`` is computed here.
    """
    gram = tree.gramian(grads, dtype=gram_dtype)
    if prev is not None:
        kwargs["prev_cross"] = cross_gramian(grads, prev, dtype=gram_dtype)
        kwargs["prev_sq_norms"] = torch.diagonal(tree.gramian(prev, dtype=gram_dtype))
    result = resolve_gramian(gram, thresholds, **kwargs)
    return result._replace(grads=tree.combine(result.coefficients, grads))


def cross_gramian(a: PyTree, b: PyTree, dtype: torch.dtype = torch.float32) -> Tensor:
    """``X_ij = <a_i, b_j>`` (K×K) of two task-stacked pytrees, leaf by leaf."""
    k = tree.num_tasks(a)
    out = None
    for x, y in zip(tree.leaves(a), tree.leaves(b), strict=True):
        term = x.reshape(k, -1).to(dtype) @ y.reshape(y.shape[0], -1).to(dtype).T
        out = term if out is None else out + term
    if out is None:
        raise ValueError("cross_gramian: the pytrees have no leaves")
    return out


def gramian_and_cross(
    a: PyTree, b: PyTree, dtype: torch.dtype = torch.float32, chunk: int = 32768
) -> tuple[Tensor, Tensor]:
    """``(G, X)``: the Gramian ``G_ij = <a_i, a_j>`` and the cross-Gramian ``X_ij = <a_i, b_j>``
    (both K×K, in ``dtype``) of two task-stacked pytrees in one pass over ``a``.

    Each leaf is walked in column blocks of ``chunk`` entries per task, so the block of ``a``
    read for ``G`` is still in cache when it is multiplied by ``b``'s block: ``a`` is read from
    memory once instead of twice (the two products are memory-bound). Equal to
    :func:`gradfn.tree.gramian` and :func:`cross_gramian` up to the order of the float sums.
    """
    k = tree.num_tasks(a)
    la, lb = tree.leaves(a), tree.leaves(b)
    if not la:
        raise ValueError("gramian_and_cross: the pytrees have no leaves")
    kb = lb[0].shape[0] if lb else k
    device = la[0].device
    g = torch.zeros(k, k, dtype=dtype, device=device)
    x = torch.zeros(k, kb, dtype=dtype, device=device)
    for u, v in zip(la, lb, strict=True):
        ru, rv = u.reshape(k, -1), v.reshape(v.shape[0], -1)
        n = ru.shape[1]
        for s in range(0, n, chunk):
            cu = ru[:, s : s + chunk].to(dtype) if n > chunk else ru.to(dtype)
            cv = rv[:, s : s + chunk].to(dtype) if n > chunk else rv.to(dtype)
            g = torch.addmm(g, cu, cu.T)
            x = torch.addmm(x, cu, cv.T)
    return g, x
