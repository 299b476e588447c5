"""GCond's resolution (arXiv:2509.07252) as vector passes over the task gradients in their own
dtype: the reference implementation's arithmetic, for bfloat16 accumulators.

:func:`gradfn.conflict.resolve_gramian` takes the same decisions in exact arithmetic on the ``K×K``
Gramian. With bfloat16 gradients the reference implementation does not: it projects the
vectors *in place*, each projection rounded back to bfloat16, and recomputes every squared norm
and dot product from the rounded vectors (each leaf upcast to float32 before the product). After
a critical-zone projection the pair's cosine is 0 in exact arithmetic but, for example, −3.6e-4
after the rounding, below the default weak threshold 0: the reference projects again where the
Gramian sees 0 and stops, and the dominance histories part. :func:`resolve_vectors` runs the same
pick / arbitrate / project loop as :func:`gradfn.conflict.resolve_gramian` (rules in its module
docstring) on the vectors themselves, with the reference's operations:

* ``<g_a, g_b> = Σ_leaf sum(g_a.float() · g_b.float())``, accumulated leaf by leaf in float32;
  cosine ``d / (sqrt(n_a·n_b) + eps)``;
* smooth rule: ``g_w ← g_w + round(α_w·g_l)``, ``g_l ← g_l + round(α_l·g_w)`` (both from the
  pre-update vectors, ``α_w = −s_w·d/(n_l+eps)``, ``α_l = −s_l·d/(n_w+eps)`` in float32);
* zones rule: critical zeroes the loser; main ``g_l ← round(g_l − β·g_w)``; weak
  ``g_i ← g_i + round(−a_ij·g_j)``, ``g_j ← round(g_j − a_ji·g_i)`` (``round``: to the vectors' dtype;
  PyTorch's vectorised CPU kernel behind the reference's ``add_(…, alpha=β)`` rounds ``β`` itself
  to bfloat16 first, which this float32 ``β`` does not copy: the migration guide's list of what
  still differs).

Only the two rows of the treated pair are read and rewritten per iteration (``O(K·n)``); no host
syncs, no Python branch on tensor values (it compiles with ``torch.compile(fullgraph=True)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from gradfn import tree
from gradfn.conflict._arbitrator import DominanceRule
from gradfn.conflict._resolve import ResolveResult, Rule, check_resolve_options
from gradfn.typing import PyTree

__all__ = ["resolve_vectors", "vector_dots"]


def _row_dots(leaves: list[Tensor], floats: list[Tensor], a: Tensor, k: int) -> Tensor:
    """``(K,)``: ``<g_a, g_m>`` for every ``m`` (``a`` a (1,) int64 index), float32."""
    out = []
    for m in range(k):
        acc = torch.zeros((), dtype=torch.float32, device=leaves[0].device)
        for f in floats:
            acc = acc + torch.sum(f.index_select(0, a) * f[m : m + 1])
        out.append(acc)
    return torch.stack(out)


def vector_dots(grads: PyTree, other: PyTree | None = None) -> Tensor:
    """The reference's float32 dot products of task-stacked pytrees, leaf by leaf: the Gramian
    ``G_ij = <g_i, g_j>`` (K×K), or with ``other`` the diagonal ``<g_k, o_k>`` (K,)."""
    leaves = tree.leaves(grads)
    k = leaves[0].shape[0]
    floats = [x.float() for x in leaves]
    if other is not None:
        others = [x.float() for x in tree.leaves(other)]
        acc = torch.zeros(k, dtype=torch.float32, device=leaves[0].device)
        for f, o in zip(floats, others, strict=True):
            acc = acc + torch.stack([torch.sum(f[m : m + 1] * o[m : m + 1]) for m in range(k)])
        return acc
    rows = [
        _row_dots(leaves, floats, torch.full((1,), i, device=leaves[0].device), k) for i in range(k)
    ]
    return torch.stack(rows)


def _cosines(cur: Tensor, eps: float) -> Tensor:
    """``G_ij / (sqrt(G_ii·G_jj) + eps)``, the reference's cosine."""
    sq = torch.diagonal(cur)
    return cur / (torch.sqrt(sq[:, None] * sq[None, :]) + eps)


def _min_cosine(cur: Tensor, valid: Tensor, eps: float) -> Tensor:
    one = torch.ones((), dtype=cur.dtype, device=cur.device)
    return torch.where(valid, _cosines(cur, eps), one).amin() if cur.shape[0] > 1 else one


def _sines(c: Tensor, t: tuple[float, float, float], p: float, eps: float) -> tuple[Tensor, Tensor]:
    """``(sin α, sin min(α, π/2))`` of the smooth rule's angle, in the reference's operation order."""
    t_c, t_m, t_w = t
    c = c.clamp(-1.0, 1.0)
    half = torch.full((), math.pi / 2.0, dtype=c.dtype, device=c.device)
    weak = half * (1.0 - ((c - t_m) / (t_w - t_m + eps)).clamp(0.0, 1.0))
    main = half + half * ((c - t_m) / (t_c - t_m + eps)).clamp(min=0.0).pow(p)
    alpha = torch.where(c >= t_m, weak, torch.where(c > t_c, main, torch.full_like(c, math.pi)))
    return torch.sin(alpha), torch.sin(torch.minimum(alpha, half))


def resolve_vectors(
    grads: PyTree,
    thresholds: Sequence[float] = (-0.8, -0.5, 0.0),
    *,
    rule: Rule = "smooth",
    max_iters: int | None = None,
    remap_power: float = 2.0,
    eps: float = 1e-8,
    norm_floor: float | None = None,
    norm_ema: Tensor | None = None,
    prev: PyTree | None = None,
    prev_sq_norms: Tensor | None = None,
    history: Tensor | None = None,
    tie_breaking_weights: Sequence[float] = (0.8, 0.2),
    dominance: DominanceRule = "loses",
    arbitrate_weak: bool = False,
    gram: Tensor | None = None,
) -> ResolveResult:
    """Resolve task-stacked ``grads`` (leaves ``(K, ...)``, any float dtype) IN PLACE, as the
    reference implementation does (module docstring).

    Arguments as :func:`gradfn.conflict.resolve_gramian`, except ``prev`` (task-stacked previous
    gradients for the stability, with their squared norms ``prev_sq_norms`` (K,); ``None``:
    stability 0) and ``gram``: the Gramian of ``grads`` from :func:`vector_dots`, if at hand.

    Returns:
        :class:`ResolveResult` with ``grads`` = the rewritten ``grads``, ``gramian`` their
        Gramian (:func:`vector_dots`), and ``coefficients`` / ``weights`` the same projections in
        float32 on the coefficient matrix (the vectors differ from ``combine(C, g⁰)`` by the
        rounding).
    """
    if (prev is None) != (prev_sq_norms is None):
        raise ValueError("resolve_vectors: give both `prev` and `prev_sq_norms`, or neither")
    leaves = tree.leaves(grads)
    k, device = leaves[0].shape[0], leaves[0].device
    t_, eps, floor, (w_stab, w_str), max_iters = check_resolve_options(
        "resolve_vectors",
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
    t = (t_[0], t_[1], t_[2])
    floor_sq = floor**2
    f32 = torch.float32
    ema = torch.ones(k, dtype=f32, device=device) if norm_ema is None else norm_ema.to(f32)
    history = torch.empty(0, dtype=torch.int64, device=device) if history is None else history
    cur = vector_dots(grads) if gram is None else gram
    prev_leaves = None if prev is None else [x.float() for x in tree.leaves(prev)]
    xd = None if prev is None else vector_dots(grads, prev)  # <g_k, p_k>
    prev_norms = None if prev_sq_norms is None else torch.sqrt(prev_sq_norms.to(f32))

    ar = torch.arange(k, device=device)
    upper = ar[:, None] < ar[None, :]
    ij = torch.stack([ar.repeat_interleave(k), ar.repeat(k)], dim=1)  # flat index -> (i, j)
    inf = torch.full((k, k), math.inf, dtype=f32, device=device)
    zero = torch.zeros((), dtype=f32, device=device)
    t_m, t_w = t[1], t[2]
    coeff = torch.eye(k, dtype=f32, device=device)

    def valid_pairs(g: Tensor) -> Tensor:
        ok = torch.diagonal(g) >= floor_sq
        return upper & ok[:, None] & ok[None, :]

    min_before = _min_cosine(cur, valid_pairs(cur), eps)
    flats, actives, won, arbitrations = [], [], [], []
    for _ in range(max_iters):
        masked = torch.where(valid_pairs(cur), _cosines(cur, eps), inf).reshape(-1)
        low, flat = masked.min(dim=0, keepdim=True)  # (1,): the first of equal minima
        active = (low < t_w).reshape(())
        c = torch.where(active, low.reshape(()), zero)
        pair = ij.index_select(0, flat)  # (1, 2)
        i, j = pair[:, 0], pair[:, 1]  # (1,) each: indices without a host read
        oh_i, oh_j = (ar == i).to(f32), (ar == j).to(f32)
        sq = torch.diagonal(cur)
        n_i, n_j, d = sq @ oh_i, sq @ oh_j, oh_i @ cur @ oh_j
        # the arbitrator, in the reference's operation order
        norms = torch.sqrt(sq)
        scaled = norms / (ema + eps)
        score = w_str * (scaled / (scaled @ oh_i + scaled @ oh_j + eps))
        if xd is not None and prev_norms is not None:
            score = w_stab * (xd / (norms * prev_norms + eps)).clamp(min=0.0) + score
        j_wins = score @ oh_j > score @ oh_i
        if history.numel():
            dom_i, dom_j = (history == i).all(), (history == j).all()
            j_wins = torch.where(dom_i == dom_j, j_wins, dom_i if dominance == "loses" else dom_j)
        win = torch.where(j_wins, j, i)
        idx = torch.cat([i, j])
        if rule == "smooth":
            s_w, s_l = _sines(c, t, remap_power, eps)
            n_w, n_l = torch.where(j_wins, n_j, n_i), torch.where(j_wins, n_i, n_j)
            a_w = torch.where(active, -s_w * (d / (n_l + eps)), zero)
            a_l = torch.where(active, -s_l * (d / (n_w + eps)), zero)
            a_i, a_j = torch.where(j_wins, a_l, a_w), torch.where(j_wins, a_w, a_l)
            for x in leaves:  # 0-d coefficients: the products are rounded to x's dtype
                r_i, r_j = x.index_select(0, i), x.index_select(0, j)
                x.index_copy_(0, j, r_j + r_i * a_j)
                x.index_copy_(0, i, r_i + r_j * a_i)
            rows = torch.stack([oh_i + a_i * oh_j, oh_j + a_j * oh_i]) @ coeff
            coeff = coeff.index_copy(0, idx, rows)
            arbitrated = active if arbitrate_weak else active & (c < t_m)
        else:
            coeff, arbitrated = _zones(
                leaves, coeff, c, active, (i, j), j_wins, (n_i, n_j, d), t, eps
            )
        floats = [x.float() for x in leaves]
        for a in (i, j):  # the two rewritten rows: their dots, by vector passes
            row = _row_dots(leaves, floats, a, k)
            cur = cur.index_copy(0, a, row[None]).index_copy(1, a, row[:, None])
            if xd is not None and prev_leaves is not None:
                dot = torch.zeros((), dtype=f32, device=device)
                for f, p in zip(floats, prev_leaves, strict=True):
                    dot = dot + torch.sum(f.index_select(0, a) * p.index_select(0, a))
                xd = xd.index_copy(0, a, dot.reshape(1))
        if history.numel():
            history = torch.where(arbitrated, torch.cat([history[1:], win]), history)
        flats.append(flat)
        actives.append(active.reshape(1))
        won.append(win)
        arbitrations.append(arbitrated.reshape(1))

    minus_one = torch.full((), -1, dtype=torch.int64, device=device)
    if max_iters:
        act = torch.cat(actives)
        iterations = act.to(torch.int64).sum()
        pairs = torch.where(act[:, None], ij[torch.cat(flats)], minus_one)
        winners = torch.where(torch.cat(arbitrations), torch.cat(won), minus_one)
    else:
        iterations = torch.zeros((), dtype=torch.int64, device=device)
        pairs = torch.empty(0, 2, dtype=torch.int64, device=device)
        winners = torch.empty(0, dtype=torch.int64, device=device)
    return ResolveResult(
        coefficients=coeff,
        weights=coeff.sum(dim=0),
        gramian=cur,
        min_cosine_before=min_before,
        min_cosine_after=_min_cosine(cur, valid_pairs(cur), eps),
        iterations=iterations,
        pairs=pairs,
        winners=winners,
        history=history,
        grads=grads,
    )


def _zones(
    leaves: list[Tensor],
    coeff: Tensor,
    c: Tensor,
    active: Tensor,
    pair: tuple[Tensor, Tensor],
    j_wins: Tensor,
    sq_dot: tuple[Tensor, Tensor, Tensor],
    t: tuple[float, float, float],
    eps: float,
) -> tuple[Tensor, Tensor]:
    """One iteration of the three-zone rule on the vectors (module docstring), the pair
    ``(i, j)`` given as (1,) indices, ``sq_dot = (n_i, n_j, d)``; returns the coefficients and
    ``arbitrated``."""
    t_c, t_m, _ = t
    i, j = pair
    n_i, n_j, d = sq_dot
    zero = torch.zeros((), dtype=coeff.dtype, device=coeff.device)
    crit = active & (c < t_c)
    main = active & (c >= t_c) & (c < t_m)
    weak = active & (c >= t_m)
    lose_i = j_wins
    n_w = torch.where(lose_i, n_j, n_i)
    b = torch.where(main, d / (n_w + eps), zero)  # g_l -= b g_w
    d_tilde = c * torch.sqrt(n_i * n_j)
    a_ij = torch.where(weak, d_tilde / (n_j + eps), zero)  # g_i -= a_ij g_j (rounded product)
    a_ji = torch.where(weak, d_tilde / (n_i + eps), zero)  # g_j -= a_ji g_i (fused)
    b_i, b_j = torch.where(lose_i, b, zero), torch.where(lose_i, zero, b)
    kill_i, kill_j = crit & lose_i, crit & ~lose_i
    for x in leaves:
        r_i, r_j = x.index_select(0, i), x.index_select(0, j)
        fi, fj = r_i.float(), r_j.float()
        new_j = (fj - (b_j + a_ji) * fi).to(x.dtype)
        new_i = torch.where(weak, r_i + r_j * (-a_ij), (fi - b_i * fj).to(x.dtype))
        x.index_copy_(0, j, torch.where(kill_j, torch.zeros_like(new_j), new_j))
        x.index_copy_(0, i, torch.where(kill_i, torch.zeros_like(new_i), new_i))
    ar = torch.arange(coeff.shape[0], device=coeff.device)
    oh_i, oh_j = (ar == i).to(coeff.dtype), (ar == j).to(coeff.dtype)
    keep_i = torch.where(kill_i, zero, 1.0)
    keep_j = torch.where(kill_j, zero, 1.0)
    rows = torch.stack(
        [keep_i * (oh_i - (b_i + a_ij) * oh_j), keep_j * (oh_j - (b_j + a_ji) * oh_i)]
    )
    coeff = coeff.index_copy(0, torch.cat([i, j]), rows @ coeff)
    return coeff, crit | main
