"""GradientConductor: gradfn vs the reference's way of computing a step, side by side in one run.

Three measurements (interleaved rounds, median; ratios from the same run):

1. **Classic mode** (every loss on every micro-batch), ``K = 4`` losses, ``N = 8`` micro-batches, the
   same model: ``gradfn.GradientConductor(stochastic_accumulation=False)`` (one forward per
   micro-batch shared by the losses, conflict resolution on the K×K Gramian) vs the reference's way:
   a separate forward + backward per loss per micro-batch, then the pairwise vector resolution
   (norms and dots of every pair recomputed each iteration, arbitrator on the vectors, host syncs),
   momentum. Both do the same algorithm; the table also gives the accumulation passes alone.
2. **Stochastic mode**: ``GradientConductor(stochastic_accumulation=True)`` vs plain gradient
   accumulation of the summed loss (``N`` forward + backward passes of ``Σ_k λ_k L_k`` into
   ``p.grad``): the conductor's full step costs at most this much more.
3. **resolve** at ``K = 16`` tasks, ``n = 10⁶`` parameters: :func:`gradfn.conflict.resolve` (Gramian +
   coefficient-space iterations + one recombination) vs the pairwise vector implementation, same
   thresholds, same ``2K`` iterations.

Usage::

    python -m benchmarks.conductor            # full run (prints a markdown table)
    python -m benchmarks.conductor --quick    # smaller sizes, fewer rounds
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import deque
from collections.abc import Callable

import torch
from torch import nn

from gradfn import GradientConductor
from gradfn.conflict import resolve

THRESHOLDS = (-0.8, -0.5, 0.0)


# ---------------------------------------------------------------------------------------------
# model and losses


class Net(nn.Module):
    def __init__(self, d_in: int, hidden: int, k: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.heads = nn.ModuleList([nn.Linear(hidden, 8) for _ in range(k)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.trunk(x)
        return [head(h) for head in self.heads]


class ConvNet(Net):
    """A small CNN trunk on 3×32×32 images (much more compute per parameter than the MLPs)."""

    def __init__(self, k: int) -> None:
        nn.Module.__init__(self)
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.heads = nn.ModuleList([nn.Linear(64, 8) for _ in range(k)])


def make_model(spec: tuple, k: int) -> tuple[nn.Module, tuple[int, ...]]:
    """``("mlp", d_in, hidden)`` or ``("cnn",)`` -> (model, input shape without the batch)."""
    if spec[0] == "cnn":
        return ConvNet(k), (3, 32, 32)
    _, d_in, hidden = spec
    return Net(d_in, hidden, k), (d_in,)


def make_losses(k: int) -> dict[str, Callable]:
    def loss(i: int) -> Callable:
        sign = -1.0 if i % 2 else 1.0  # alternate targets: the losses conflict

        def f(out: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
            return ((out[i] - sign * y) ** 2).mean()

        return f

    return {f"l{i}": loss(i) for i in range(k)}


# ---------------------------------------------------------------------------------------------
# the reference's way, written plainly


def vector_resolve(
    g: list[torch.Tensor],
    prev: list[torch.Tensor] | None,
    ema: list[float],
    hist: deque,
    window: int,
    eps: float = 1e-8,
) -> list[torch.Tensor]:
    """Pairwise vector resolution as the reference runs it (smooth rule, arbitrator, host syncs)."""
    t_c, t_m, t_w = THRESHOLDS
    k = len(g)
    for _ in range(2 * k):
        best, pair = t_w, None
        for i in range(k):
            for j in range(i + 1, k):
                ni, nj = (g[i] @ g[i]).item(), (g[j] @ g[j]).item()
                if ni < eps or nj < eps:
                    continue
                d = (g[i] @ g[j]).item()
                c = d / (math.sqrt(ni * nj) + eps)
                if c < best:
                    best, pair = c, (i, j, d, ni, nj)
        if pair is None:
            break
        i, j, d, ni, nj = pair
        c = best

        def dominant(a: int) -> bool:
            return window > 0 and len(hist) == window and all(h == a for h in hist)

        if dominant(i) and not dominant(j):
            w, lo = j, i
        elif dominant(j) and not dominant(i):
            w, lo = i, j
        else:

            def stab(a: int) -> float:
                if prev is None:
                    return 0.0
                den = g[a].norm().item() * prev[a].norm().item() + eps
                return (g[a] @ prev[a]).item() / den

            rel = {a: g[a].norm().item() / (ema[a] + eps) for a in (i, j)}
            tot = rel[i] + rel[j] + eps
            si = 0.8 * max(stab(i), 0.0) + 0.2 * rel[i] / tot
            sj = 0.8 * max(stab(j), 0.0) + 0.2 * rel[j] / tot
            w, lo = (j, i) if sj > si else (i, j)
        if window > 0:
            hist.append(w)
        if c >= t_m:
            alpha = math.pi / 2 * (1 - min(max((c - t_m) / (t_w - t_m + eps), 0.0), 1.0))
        elif c > t_c:
            alpha = math.pi / 2 + math.pi / 2 * ((c - t_m) / (t_c - t_m + eps)) ** 2
        else:
            alpha = math.pi
        s_w, s_l = math.sin(alpha), math.sin(min(alpha, math.pi / 2))
        n = {i: ni, j: nj}
        gw, gl = g[w].clone(), g[lo].clone()
        g[w] = gw - s_w * d / (n[lo] + eps) * gl
        g[lo] = gl - s_l * d / (n[w] + eps) * gw
    return g


class ReferenceWay:
    """A GCond step computed the reference's way (classic mode)."""

    def __init__(self, model: nn.Module, losses: dict, n: int, beta: float = 0.85) -> None:
        self.model, self.losses, self.n, self.beta = model, losses, n, beta
        self.params = [p for p in model.parameters() if p.requires_grad]
        size = sum(p.numel() for p in self.params)
        self.k = len(losses)
        self.prev = [torch.zeros(size) for _ in range(self.k)]
        self.ema = [1.0] * self.k
        self.hist: deque = deque(maxlen=3)
        self.m = torch.zeros(size)
        self.t = 0

    def accumulate(self, provider: Callable) -> list[torch.Tensor]:
        acc = [[torch.zeros_like(p) for p in self.params] for _ in range(self.k)]
        for _ in range(self.n):
            x, y = provider()
            for i, fn in enumerate(self.losses.values()):
                loss = fn(self.model(x), y) / self.n  # a separate forward per loss
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                for a, g in zip(acc[i], grads, strict=True):
                    if g is not None:
                        a += g
                loss.item()  # the reference logs every pass
        return [torch.cat([a.reshape(-1) for a in per]) for per in acc]

    def step(self, provider: Callable) -> None:
        a = self.accumulate(provider)
        for i in range(self.k):
            self.ema[i] = max(0.95 * self.ema[i] + 0.05 * a[i].norm().item(), 1e-8)
        g = vector_resolve([x.clone() for x in a], self.prev, self.ema, self.hist, 3)
        total = torch.stack(g).sum(0)
        self.t += 1
        self.m = self.beta * self.m + (1 - self.beta) * total
        update = self.m / (1 - self.beta**self.t)
        offset = 0
        for p in self.params:
            p.grad = update[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        self.prev = g


# ---------------------------------------------------------------------------------------------
# timing


def median_ms(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    for fn in fns.values():  # warm-up (and the adapter's first-step probe)
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}


def provider_of(batches: list) -> Callable:
    it = iter(batches)
    return lambda: next(it)


def bench_classic(k: int, n: int, batch: int, spec: tuple, rounds: int, compiled: bool) -> dict:
    torch.manual_seed(0)
    model, shape = make_model(spec, k)
    losses = make_losses(k)
    lambdas = dict.fromkeys(losses, 1.0)
    batches = [(torch.randn(batch, *shape), torch.randn(batch, 8)) for _ in range(n)]
    ours = GradientConductor(model, losses, lambdas, n, stochastic_accumulation=False)
    ref = ReferenceWay(model, losses, n)
    fns = {
        "gradfn": lambda: ours.step(provider_of(batches)),
        "reference": lambda: ref.step(provider_of(batches)),
        "ref_passes": lambda: ref.accumulate(provider_of(batches)),
    }
    if compiled:
        comp = GradientConductor(
            model, losses, lambdas, n, stochastic_accumulation=False, compile=True
        )
        fns["compiled"] = lambda: comp.step(provider_of(batches))
    return median_ms(fns, rounds)


def bench_stochastic(k: int, n: int, batch: int, spec: tuple, rounds: int, compiled: bool) -> dict:
    torch.manual_seed(0)
    model, shape = make_model(spec, k)
    losses = make_losses(k)
    lambdas = dict.fromkeys(losses, 1.0)
    batches = [(torch.randn(batch, *shape), torch.randn(batch, 8)) for _ in range(n)]
    ours = GradientConductor(model, losses, lambdas, n, stochastic_accumulation=True)

    def plain() -> None:
        model.zero_grad()
        for x, y in batches:
            out = model(x)
            (sum(fn(out, y) for fn in losses.values()) / n).backward()

    fns = {"gradfn": lambda: ours.step(provider_of(batches)), "plain": plain}
    if compiled:
        comp = GradientConductor(
            model, losses, lambdas, n, stochastic_accumulation=True, compile=True
        )
        fns["compiled"] = lambda: comp.step(provider_of(batches))
    return median_ms(fns, rounds)


def bench_resolve(k: int, n: int, rounds: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=gen)
    # correlated tasks with alternating signs: many conflicting pairs
    rows = [(-1.0) ** i * 0.6 * base + torch.randn(n, generator=gen) for i in range(k)]
    stacked = {"w": torch.stack(rows)}
    prev = [torch.randn(n, generator=gen) for _ in range(k)]
    prev_stacked = {"w": torch.stack(prev)}
    ema = torch.ones(k)

    def ours() -> None:
        resolve(stacked, prev=prev_stacked, norm_ema=ema, history=torch.full((3,), -1))

    def vector() -> None:
        vector_resolve(list(stacked["w"].clone().unbind(0)), prev, [1.0] * k, deque(maxlen=3), 3)

    res = resolve(stacked, prev=prev_stacked, norm_ema=ema, history=torch.full((3,), -1))
    ms = median_ms({"gradfn": ours, "vector": vector}, rounds)
    ms["iters"] = int(res.iterations)
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile'd rows (slow to build)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    k, n = 4, 8
    if args.quick:
        rounds, batch, resolve_n, resolve_rounds = 5, 64, 100_000, 3
        models = [("MLP 128-256-256", ("mlp", 128, 256))]
    else:
        rounds, batch, resolve_n, resolve_rounds = 7, 128, 1_000_000, 5
        models = [
            ("MLP 512-1024-1024", ("mlp", 512, 1024)),
            ("wide-input MLP 4096-256-256", ("mlp", 4096, 256)),
            ("CNN 3x32x32, 3 convs", ("cnn",)),
        ]
    compiled = not (args.quick or args.no_compile)
    rows = []
    for index, (name, spec) in enumerate(models):
        comp = compiled and index == 0
        size = 64 if spec[0] == "cnn" else batch
        classic = bench_classic(k, n, size, spec, rounds, comp)
        stoch = bench_stochastic(k, n, size, spec, rounds, comp)
        rows.append((name, classic, stoch))
    res = bench_resolve(16, resolve_n, resolve_rounds)

    print(
        f"CPU, torch threads={args.threads}; models: trunk + {k} linear heads, micro-batch "
        f"{batch} (CNN: 64), K={k} losses, N={n} micro-batches; median of {rounds} interleaved "
        "rounds\n"
    )
    print("| measurement | model | gradfn ms | baseline ms | ratio | target |")
    print("|---|---|---|---|---|---|")
    for name, classic, stoch in rows:
        ref = classic["reference"]
        print(
            f"| classic step vs the reference's way | {name} | {classic['gradfn']:.1f} "
            f"| {ref:.1f} | {ref / classic['gradfn']:.2f}x faster | >= 1.5x faster |"
        )
        if "compiled" in classic:
            print(
                f"| classic step, resolve + momentum compiled | {name} | {classic['compiled']:.1f} "
                f"| {ref:.1f} | {ref / classic['compiled']:.2f}x faster | >= 1.5x faster |"
            )
        print(
            f"| classic step vs the reference's passes alone (no resolution) | {name} "
            f"| {classic['gradfn']:.1f} | {classic['ref_passes']:.1f} "
            f"| {classic['ref_passes'] / classic['gradfn']:.2f}x faster | (information) |"
        )
        plain = stoch["plain"]
        print(
            f"| stochastic step vs plain accumulation of the summed loss | {name} "
            f"| {stoch['gradfn']:.1f} | {plain:.1f} | {stoch['gradfn'] / plain:.2f}x | <= 1.1x |"
        )
        if "compiled" in stoch:
            print(
                f"| stochastic step, resolve + momentum compiled | {name} "
                f"| {stoch['compiled']:.1f} | {plain:.1f} | {stoch['compiled'] / plain:.2f}x "
                "| <= 1.1x |"
            )
    print(
        f"| resolve, K=16, {res['iters']} iterations, vs pairwise vectors | n={resolve_n:.0e} "
        f"| {res['gradfn']:.1f} | {res['vector']:.1f} | {res['vector'] / res['gradfn']:.1f}x faster "
        "| >= 10x faster |"
    )


if __name__ == "__main__":
    main()
