"""Naive reference implementations the tests compare gradfn against.

Each is written from the papers' formulas the plain way (Python loops over tasks and pairs, flat
vectors, no K-space tricks), so that it shares no code with the library:

* :func:`gcond_resolve`, :func:`gcond_min_cosine`: GCond's pairwise conflict resolution
  (arXiv:2509.07252: the smooth and three-zone rules, the arbitrator, the winner ring);
* :func:`pcgrad`: PCGrad (Yu et al. 2020) with explicit visiting orders;
* :func:`inverse_norm_weights`: SON-GOKU's reference in-group inverse-norm weighting;
* :func:`masked_ema`, :func:`welsh_powell_classes`, :func:`plain_songoku_loop`: SON-GOKU
  (arXiv:2509.16959) as a plain PyTorch training loop.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "DEFAULT_THRESHOLDS",
    "gcond_min_cosine",
    "gcond_resolve",
    "inverse_norm_weights",
    "masked_ema",
    "pcgrad",
    "plain_songoku_loop",
    "welsh_powell_classes",
]

DEFAULT_THRESHOLDS = (-0.8, -0.5, 0.0)


# ---------------------------------------------------------------------------------------------
# GCond


def gcond_resolve(
    gs: Sequence[torch.Tensor],
    thresholds: tuple[float, float, float] = DEFAULT_THRESHOLDS,
    *,
    rule: str = "smooth",
    max_iters: int | None = None,
    p: float = 2.0,
    eps: float = 1e-8,
    floor_sq: float | None = None,
    ema: Sequence[float] | None = None,
    prev: Sequence[torch.Tensor] | None = None,
    history: Sequence[int] | None = None,
    window: int = 0,
    weights: tuple[float, float] = (0.8, 0.2),
    dominance: str = "loses",
    arbitrate_weak: bool = True,
) -> tuple[list[torch.Tensor], int, list[int], list[int]]:
    """GCond's resolution of the flat gradients ``gs``, one pair at a time.

    Returns ``(resolved vectors, iterations, winners, winner ring after)``. Each iteration picks
    the most conflicting pair (lowest cosine below the weak threshold, both squared norms at least
    ``floor_sq``), the arbitrator names a winner (a dominant task of a full ring loses, or wins
    with ``dominance="wins"``; else the hybrid score of stability against ``prev`` and strength
    against the norm EMA ``ema``), and the rule rewrites the pair.
    """
    t_c, t_m, t_w = thresholds
    k = len(gs)
    g = [x.clone() for x in gs]
    floor_sq = eps if floor_sq is None else floor_sq
    ema = [1.0] * k if ema is None else list(ema)
    hist = deque(history or [], maxlen=window) if window > 0 else None
    winners: list[int] = []
    iters = 0

    def arbiter(i: int, j: int) -> tuple[int, int]:
        def dominant(a: int) -> bool:
            return hist is not None and len(hist) == window and all(h == a for h in hist)

        if dominant(i) and not dominant(j):
            return (j, i) if dominance == "loses" else (i, j)
        if dominant(j) and not dominant(i):
            return (i, j) if dominance == "loses" else (j, i)

        def stab(a: int) -> float:
            if prev is None:
                return 0.0
            return float(g[a] @ prev[a] / (g[a].norm() * prev[a].norm() + eps))

        rel_i = float(g[i].norm()) / (ema[i] + eps)
        rel_j = float(g[j].norm()) / (ema[j] + eps)
        si = weights[0] * max(stab(i), 0.0) + weights[1] * rel_i / (rel_i + rel_j + eps)
        sj = weights[0] * max(stab(j), 0.0) + weights[1] * rel_j / (rel_i + rel_j + eps)
        return (j, i) if sj > si else (i, j)

    def record(w: int) -> None:
        winners.append(w)
        if hist is not None:
            hist.append(w)

    for _ in range(max_iters if max_iters is not None else 2 * k):
        best, pair = t_w, None
        for i in range(k):
            for j in range(i + 1, k):
                ni, nj = float(g[i] @ g[i]), float(g[j] @ g[j])
                if ni < floor_sq or nj < floor_sq:
                    continue
                d = float(g[i] @ g[j])
                c = d / (math.sqrt(ni * nj) + eps)
                if c < best:
                    best, pair = c, (i, j, d, ni, nj)
        if pair is None:
            break
        iters += 1
        i, j, d, ni, nj = pair
        c = best
        if rule == "smooth":
            w, lo = arbiter(i, j)
            if arbitrate_weak or c < t_m:
                record(w)
            cc = min(max(c, -1.0), 1.0)
            if cc >= t_m:
                u = min(max((cc - t_m) / (t_w - t_m + eps), 0.0), 1.0)
                alpha = math.pi / 2 * (1 - u)
            elif cc > t_c:
                u = (cc - t_m) / (t_c - t_m + eps)
                alpha = math.pi / 2 + math.pi / 2 * u**p
            else:
                alpha = math.pi
            s_w, s_l = math.sin(alpha), math.sin(min(alpha, math.pi / 2))
            n = {i: ni, j: nj}
            gw, gl = g[w].clone(), g[lo].clone()
            g[w] = gw - s_w * d / (n[lo] + eps) * gl
            g[lo] = gl - s_l * d / (n[w] + eps) * gw
        else:
            if c < t_c:
                w, lo = arbiter(i, j)
                record(w)
                g[lo] = torch.zeros_like(g[lo])
            elif c < t_m:
                w, lo = arbiter(i, j)
                record(w)
                g[lo] = g[lo] - float(g[lo] @ g[w]) / (float(g[w] @ g[w]) + eps) * g[w]
            else:
                dt = c * math.sqrt(ni * nj)
                gi, gj = g[i].clone(), g[j].clone()
                g[i] = gi - dt / (nj + eps) * gj
                g[j] = gj - dt / (ni + eps) * gi
    return g, iters, winners, list(hist) if hist is not None else []


def gcond_min_cosine(
    gs: Sequence[torch.Tensor], eps: float = 1e-8, floor_sq: float | None = None
) -> float:
    """The lowest pairwise cosine among gradients above the floor (1.0 when there is none)."""
    floor_sq = eps if floor_sq is None else floor_sq
    best = 1.0
    for i in range(len(gs)):
        for j in range(i + 1, len(gs)):
            ni, nj = float(gs[i] @ gs[i]), float(gs[j] @ gs[j])
            if ni >= floor_sq and nj >= floor_sq:
                best = min(best, float(gs[i] @ gs[j]) / (math.sqrt(ni * nj) + eps))
    return best


# ---------------------------------------------------------------------------------------------
# aggregators


def pcgrad(
    grads: Sequence[torch.Tensor], active: Sequence[bool], order: torch.Tensor, mean: bool
) -> torch.Tensor:
    """PCGrad over the active tasks' flat gradients: task ``i`` visits ``order[i]`` (skipping
    itself and inactive tasks) and projects off each conflicting original gradient; the sum (or,
    with ``mean``, the average) of the projected gradients."""
    out = []
    idx = [i for i in range(len(grads)) if active[i]]
    for i in idx:
        g = grads[i].clone()
        for j in order[i].tolist():
            if j == i or j not in idx:
                continue
            dot = g @ grads[j]
            if dot < 0:
                g = g - dot / max(float(grads[j] @ grads[j]), 1e-12) * grads[j]
        out.append(g)
    total = sum(out)
    return total / len(idx) if mean else total


def inverse_norm_weights(
    norms: Sequence[float], active: Sequence[bool], ema: list[float | None], beta: float = 0.9
) -> list[float]:
    """One step of the inverse-norm weighting, in place on ``ema`` (``None``: not seen yet).

    For active tasks ``n_i = ‖g_i‖ + 1e-8``, ``ema_i ← n_i`` the first time, else
    ``β ema_i + (1 − β) n_i``; ``w_i = (1/max(ema_i, 1e-8)) · |S| / (Σ_{j∈S} 1/max(ema_j, 1e-8)
    + 1e-8)`` for active ``i``, 0 otherwise.
    """
    for i, on in enumerate(active):
        if on:
            n = norms[i] + 1e-8
            ema[i] = n if ema[i] is None else beta * ema[i] + (1 - beta) * n
    inv = [1.0 / max(e, 1e-8) if on else 0.0 for e, on in zip(ema, active, strict=True)]
    count = sum(1 for on in active if on)
    return [v * count / (sum(inv) + 1e-8) for v in inv]


# ---------------------------------------------------------------------------------------------
# SON-GOKU


def masked_ema(ema: torch.Tensor, g: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """``e_k ← β e_k + (1 − β) g_k`` for the rows in ``mask``, the others kept (zero start)."""
    return torch.where(mask[:, None], beta * ema + (1 - beta) * g, ema)


def welsh_powell_classes(adj: Any) -> list[list[int]]:
    """Greedy colouring in Welsh–Powell order (degree descending, ties by index), each vertex in
    the first class without a neighbour; the classes in creation order, members sorted."""
    k = len(adj)
    nbrs = {i: {j for j in range(k) if j != i and bool(adj[i][j])} for i in range(k)}
    order = sorted(range(k), key=lambda v: (-len(nbrs[v]), v))
    classes: list[list[int]] = []
    for v in order:
        for cls in classes:
            if not nbrs[v] & set(cls):
                cls.append(v)
                break
        else:
            classes.append([v])
    return [sorted(c) for c in classes]


def plain_songoku_loop(
    model: torch.nn.Module,
    task_losses: Sequence[Callable[[torch.nn.Module, Any], torch.Tensor]],
    shared: Sequence[torch.nn.Parameter],
    heads: Sequence[Sequence[torch.nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    data: Sequence[Sequence[Any]],
    *,
    refresh_period: int,
    tau: float,
    beta: float,
    eps: float = 1e-12,
    inverse_norm: bool = False,
) -> tuple[list[list[int]], list[list[int]]]:
    """The paper's training loop with one forward and backward per active task.

    ``data[t][k]`` is task ``k``'s batch at step ``t``. Every step the active group's shared
    gradients are summed, each active head gets its own task's gradient, the active tasks' EMAs
    of the flat shared gradient are updated (zero start), and the optimizer steps; every
    ``refresh_period`` steps the graph ``ρ_ij = −cos(e_i, e_j) > τ`` is coloured (Welsh–Powell)
    and the cycle restarts at its first group. Returns ``(active group per step, final groups)``.
    ``inverse_norm``: the shared sum and each head's gradient are weighted by
    :func:`inverse_norm_weights` of the shared gradients' norms (Python floats: float64).
    """
    k = len(task_losses)
    ema: list[torch.Tensor | None] = [None] * k
    norm_ema: list[float | None] = [None] * k
    classes = [list(range(k))]
    ptr, t = 0, 0
    history = []
    for batch in data:
        active = classes[ptr]
        history.append(list(active))
        shared_sum = [torch.zeros_like(p) for p in shared]
        head_grads = {}
        shared_grads = {}
        for i in active:
            model.zero_grad(set_to_none=True)
            task_losses[i](model, batch[i]).backward()
            g = [p.grad.clone() for p in shared]
            shared_sum = [a + b for a, b in zip(shared_sum, g, strict=True)]
            head_grads[i] = [p.grad.clone() for p in heads[i]]
            flat = torch.cat([x.reshape(-1) for x in g])
            prev = ema[i]
            ema[i] = (1 - beta) * flat if prev is None else beta * prev + (1 - beta) * flat
            shared_grads[i] = g
        if inverse_norm:
            norms = [
                math.sqrt(sum(float((x * x).sum()) for x in shared_grads[i]))
                if i in active
                else 0.0
                for i in range(k)
            ]
            w = inverse_norm_weights(norms, [i in active for i in range(k)], norm_ema, 0.9)
            shared_sum = [torch.zeros_like(p) for p in shared]
            for i in active:
                shared_sum = [
                    a + w[i] * b for a, b in zip(shared_sum, shared_grads[i], strict=True)
                ]
                head_grads[i] = [w[i] * x for x in head_grads[i]]
        optimizer.zero_grad(set_to_none=True)
        for p, g in zip(shared, shared_sum, strict=True):
            p.grad = g
        for i in active:
            for p, g in zip(heads[i], head_grads[i], strict=True):
                p.grad = g
        optimizer.step()
        t += 1
        ptr = (ptr + 1) % len(classes)
        if t % refresh_period == 0:
            adj = [[False] * k for _ in range(k)]
            for i in range(k):
                for j in range(k):
                    if i == j:
                        continue
                    ei, ej = ema[i], ema[j]
                    assert ei is not None and ej is not None
                    ni, nj = float(ei.norm()) + eps, float(ej.norm()) + eps
                    adj[i][j] = -float(ei @ ej) / (ni * nj) > tau
            classes = welsh_powell_classes(adj)
            ptr = 0
    return history, classes
