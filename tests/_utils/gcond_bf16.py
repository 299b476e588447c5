"""GCond's reference implementation as shipped (arXiv:2509.07252), emulated plainly: bfloat16
accumulators resolved in place, one parameter tensor at a time.

Written from the algorithm's description, independently of gradfn: Python loops over losses,
pairs and parameter tensors, Python floats for the norm EMAs, a ``deque`` for the winner history.
Every squared norm and dot product is recomputed from the current bfloat16 tensors, each tensor
upcast to float32 before the product and the per-tensor sums added in float32; every projection
is written back into the bfloat16 tensors.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["ReferenceGCond", "dot", "resolve_in_place", "sq_norm"]

BF16 = torch.bfloat16


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """``Σ_tensors sum(a.float() · b.float())`` in float32."""
    acc = torch.zeros((), dtype=torch.float32)
    for x, y in zip(a, b, strict=True):
        acc += torch.sum(x.float() * y.float())
    return acc


def sq_norm(a: Sequence[torch.Tensor]) -> torch.Tensor:
    acc = torch.zeros((), dtype=torch.float32)
    for x in a:
        acc += torch.sum(x.float().pow(2))
    return acc


def _alpha(c: torch.Tensor, t: tuple[float, float, float], p: float, eps: float) -> torch.Tensor:
    c = c.clamp(-1.0, 1.0)
    t_c, t_m, t_w = t
    half = torch.tensor(math.pi / 2.0)
    if c >= t_m:
        return half * (1.0 - ((c - t_m) / (t_w - t_m + eps)).clamp(0.0, 1.0))
    if c > t_c:
        return half + half * ((c - t_m) / (t_c - t_m + eps)).pow(p)
    return torch.tensor(math.pi)


def resolve_in_place(
    g: list[list[torch.Tensor]],
    *,
    t: tuple[float, float, float] = (-0.8, -0.5, 0.0),
    smooth: bool = True,
    max_iters: int | None = None,
    p: float = 2.0,
    eps: float = 1e-8,
    ema: Sequence[float] | None = None,
    prev: list[list[torch.Tensor]] | None = None,
    hist: deque[int] | None = None,
    window: int = 3,
    weights: tuple[float, float] = (0.8, 0.2),
) -> dict[str, Any]:
    """Resolve the per-loss tensor lists ``g`` in place. ``hist`` is updated in place. Returns
    ``proj_iters``, ``min_cosine_sim`` (1.0 unless a pair is below the weak threshold) and
    ``winners`` (one per arbitration)."""
    k = len(g)
    ema = [1.0] * k if ema is None else list(ema)
    hist = deque(maxlen=window) if hist is None else hist
    stats: dict[str, Any] = {"proj_iters": 0, "min_cosine_sim": 1.0, "winners": []}

    def arbiter(i: int, j: int) -> tuple[int, int]:
        full = window > 0 and len(hist) == window
        dom_i = full and hist.count(i) == window
        dom_j = full and hist.count(j) == window
        if dom_i and not dom_j:
            return j, i
        if dom_j and not dom_i:
            return i, j
        n_i, n_j = sq_norm(g[i]).sqrt(), sq_norm(g[j]).sqrt()
        stab = []
        for a, n_a in ((i, n_i), (j, n_j)):
            if prev is None:
                stab.append(torch.zeros(()))
            else:
                stab.append(dot(g[a], prev[a]) / (n_a * sq_norm(prev[a]).sqrt() + eps))
        r_i, r_j = n_i / (ema[i] + eps), n_j / (ema[j] + eps)
        score_i = weights[0] * stab[0].clamp(min=0) + weights[1] * (r_i / (r_i + r_j + eps))
        score_j = weights[0] * stab[1].clamp(min=0) + weights[1] * (r_j / (r_i + r_j + eps))
        return (j, i) if score_j > score_i else (i, j)

    def record(w: int) -> None:
        stats["winners"].append(w)
        if window > 0:
            hist.append(w)

    for it in range(max_iters or 2 * k):
        best, pair = torch.tensor(t[2]), None
        for i in range(k):
            for j in range(i + 1, k):
                n_i, n_j = sq_norm(g[i]), sq_norm(g[j])
                if n_i < eps or n_j < eps:
                    continue
                d = dot(g[i], g[j])
                c = d / (torch.sqrt(n_i * n_j) + eps)
                if c < best:
                    best, pair = c, (i, j, d, n_i, n_j)
        if pair is None:
            break
        if it == 0:
            stats["min_cosine_sim"] = float(best)
        stats["proj_iters"] = it + 1
        i, j, d, n_i, n_j = pair
        c = best
        if smooth:
            w, lo = arbiter(i, j)
            record(w)
            n = {i: n_i, j: n_j}
            alpha = _alpha(c, t, p, eps)
            s_w = torch.sin(alpha)
            s_l = torch.sin(torch.minimum(alpha, torch.tensor(math.pi / 2.0)))
            a_w, a_l = -s_w * (d / (n[lo] + eps)), -s_l * (d / (n[w] + eps))
            for x_w, x_l in zip(g[w], g[lo], strict=True):
                u_w, u_l = x_l.mul(a_w), x_w.mul(a_l)
                x_w.add_(u_w)
                x_l.add_(u_l)
        elif c < t[0]:
            w, lo = arbiter(i, j)
            for x in g[lo]:
                x.zero_()
            record(w)
        elif c < t[1]:
            w, lo = arbiter(i, j)
            b = dot(g[lo], g[w]) / (sq_norm(g[w]) + eps)
            for x_l, x_w in zip(g[lo], g[w], strict=True):  # float32 coefficient, one rounding
                x_l.copy_(x_l.float() - b * x_w.float())
            record(w)
        else:
            d_t = c * torch.sqrt(n_i * n_j)
            a_ij, a_ji = d_t / (n_j + eps), d_t / (n_i + eps)
            for x_i, x_j in zip(g[i], g[j], strict=True):
                u_i = x_j.mul(-a_ij)
                x_j.copy_(x_j.float() - a_ji * x_i.float())
                x_i.add_(u_i)
    return stats


class ReferenceGCond:
    """One ``step`` of the shipped reference for a model and loss dict: classic accumulation
    (a separate forward and backward per loss and micro-batch, ``loss·λ/N``), bfloat16
    accumulators, norm EMAs (Python floats, updated before use), in-place resolution, the
    float32 sum, bfloat16 bias-corrected momentum (``M.mul_(β).add_(G, alpha=1−β)``; ``raw``:
    ``p.grad`` is the sum, the reference's ``return_raw_grad``), then the buffers are kept as the
    previous gradients."""

    def __init__(
        self,
        model: torch.nn.Module,
        losses: dict[str, Callable[..., torch.Tensor]],
        lambdas: dict[str, float],
        n: int,
        *,
        smooth: bool = True,
        t: tuple[float, float, float] = (-0.8, -0.5, 0.0),
        beta: float = 0.85,
        ema_beta: float = 0.95,
        window: int = 3,
        eps: float = 1e-8,
        raw: bool = False,
    ) -> None:
        self.raw, self.thresholds = raw, t
        self.model, self.losses, self.lambdas, self.n = model, losses, lambdas, n
        self.smooth, self.beta, self.ema_beta, self.window, self.eps = (
            smooth,
            beta,
            ema_beta,
            window,
            eps,
        )
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.names = list(losses)
        self.prev = [[torch.zeros_like(p, dtype=BF16) for p in self.params] for _ in self.names]
        self.ema = [1.0] * len(self.names)
        self.hist: deque[int] = deque(maxlen=window)
        self.m = [torch.zeros_like(p, dtype=BF16) for p in self.params]
        self.t = 0

    def step(self, next_batch: Callable[[], Any]) -> dict[str, Any]:
        acc = [[torch.zeros_like(p, dtype=BF16) for p in self.params] for _ in self.names]
        for _ in range(self.n):
            x, y = next_batch()
            for a, name in zip(acc, self.names, strict=True):
                loss = self.losses[name](self.model(x), y) * self.lambdas[name] / self.n
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                for buf, gr in zip(a, grads, strict=True):
                    if gr is not None:
                        buf.add_(gr.to(BF16))
        with torch.no_grad():
            for i, a in enumerate(acc):
                r = float(sq_norm(a).sqrt())
                self.ema[i] = max(self.ema_beta * self.ema[i] + (1 - self.ema_beta) * r, self.eps)
            stats = resolve_in_place(
                acc,
                t=self.thresholds,
                smooth=self.smooth,
                eps=self.eps,
                ema=self.ema,
                prev=self.prev,
                hist=self.hist,
                window=self.window,
            )
            total = [x.float() for x in acc[0]]
            for a in acc[1:]:
                for out, x in zip(total, a, strict=True):
                    out.add_(x)
            self.t += 1
            bc = 1.0 - self.beta**self.t
            for m, g, p in zip(self.m, total, self.params, strict=True):
                m.mul_(self.beta).add_(g, alpha=1.0 - self.beta)
                p.grad = g.to(p.dtype) if self.raw else (m / bc).to(p.dtype)
            self.prev = acc
        stats["total"] = total
        return stats
