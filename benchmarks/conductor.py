"""GradientConductor: its step against the cost floors it is measured by, side by side in one run.

Every row times runners in interleaved rounds (``benchmarks._common.interleave``) and gives the
median and the spread ``[min–max]``; ratios are per-round ratios of runners timed together. Each
runner ends with the same optimizer step (SGD, ``lr = 1e-6``), so every row compares full steps.

1. **Stochastic mode** (loss ``k`` on its own ``N/K`` micro-batches):
   ``GradientConductor(stochastic_accumulation=True).step`` vs **plain accumulation** of the summed
   loss (``N`` forward + backward passes of ``Σ_k λ_k L_k`` into ``p.grad``).
2. **Classic mode** (every loss on every micro-batch): ``GradientConductor(
   stochastic_accumulation=False).step`` vs its **K-backward bound**: ``N`` micro-batches × (one
   forward + ``K`` ``torch.autograd.grad`` calls with the graph retained, added into ``p.grad``),
   the passes any implementation of classic mode must make, with nothing else.
3. **Classic mode vs the reference's way** (a separate forward + backward per loss per
   micro-batch, the pairwise vector resolution with its host syncs, momentum) and
   **resolve** at ``K = 16`` (:func:`gradfn.conflict.resolve` vs the pairwise vectors).

``K = 4`` losses (alternating-sign regression targets: they conflict), ``N = 8`` micro-batches,
an MLP trunk with ``K`` linear heads.

Usage::

    python -m benchmarks.conductor            # full run (prints markdown tables)
    python -m benchmarks.conductor --quick    # small models only, fewer rounds
    python -m benchmarks.conductor --compile  # plus classic mode with its process compiled
"""

from __future__ import annotations

import argparse
import math
from collections import deque
from collections.abc import Callable

import torch
from torch import nn

from benchmarks._common import (
    Timing,
    add_common_args,
    environment,
    interleave,
    progress,
    ratio_spread,
    setup,
)
from gradfn import GradientConductor
from gradfn.conflict import resolve

THRESHOLDS = (-0.8, -0.5, 0.0)
K, N = 4, 8


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
        device = self.params[0].device
        self.prev = [torch.zeros(size, device=device) for _ in range(self.k)]
        self.ema = [1.0] * self.k
        self.hist: deque = deque(maxlen=3)
        self.m = torch.zeros(size, device=device)
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
# runners


def params_of(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Problem:
    """A model, its ``K`` losses, ``N`` micro-batches on ``device`` and an SGD step."""

    def __init__(self, spec: tuple, batch: int, device: torch.device, seed: int = 0) -> None:
        torch.manual_seed(seed)
        model, shape = make_model(spec, K)
        self.model = model.to(device)
        self.losses = make_losses(K)
        self.lambdas = dict.fromkeys(self.losses, 1.0)
        self.batches = [
            (torch.randn(batch, *shape, device=device), torch.randn(batch, 8, device=device))
            for _ in range(N)
        ]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=1e-6)
        self.size = params_of(self.model)

    def provider(self) -> Callable:
        it = iter(self.batches)
        return lambda: next(it)

    def conductor(self, stochastic: bool, **options: object) -> Callable[[], None]:
        gc = GradientConductor(
            self.model,
            self.losses,
            self.lambdas,
            N,
            stochastic_accumulation=stochastic,
            **options,  # type: ignore[arg-type]
        )

        def step() -> None:
            gc.step(self.provider())
            self.opt.step()

        return step

    def plain(self) -> None:
        """Plain accumulation of the summed loss: N forward + backward passes into p.grad."""
        self.opt.zero_grad()
        for x, y in self.batches:
            out = self.model(x)
            (sum(fn(out, y) for fn in self.losses.values()) / N).backward()
        self.opt.step()

    def bound(self) -> None:
        """Classic mode's floor: per micro-batch one forward and K autograd.grad calls (graph
        retained), each added into p.grad; then the optimizer step."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()
        fns = list(self.losses.values())
        for x, y in self.batches:
            out = self.model(x)
            for i, fn in enumerate(fns):
                grads = torch.autograd.grad(
                    fn(out, y) / N, self.params, retain_graph=i < K - 1, allow_unused=True
                )
                with torch.no_grad():
                    for p, g in zip(self.params, grads, strict=True):
                        if g is not None:
                            p.grad.add_(g)  # type: ignore[union-attr]
        self.opt.step()

    def reference_way(self) -> Callable[[], None]:
        ref = ReferenceWay(self.model, self.losses, N)

        def step() -> None:
            ref.step(self.provider())
            self.opt.step()

        return step


Row = tuple[str, str, Timing, Timing, str, str]


def stochastic_rows(name: str, pb: Problem, device: torch.device, rounds: int) -> list[Row]:
    t = interleave(
        {"gcond": pb.conductor(True), "plain": pb.plain}, device, rounds=rounds, warmup=2
    )
    target = "<= 1.2x" if pb.size >= 1_000_000 else "(information)"
    return [
        (
            "stochastic step / plain accumulation",
            name,
            t["gcond"],
            t["plain"],
            ratio_spread(t["gcond"], t["plain"]),
            target,
        )
    ]


def classic_rows(
    name: str, pb: Problem, device: torch.device, rounds: int, reference: bool, compiled: bool
) -> list[Row]:
    runners = {"gcond": pb.conductor(False), "bound": pb.bound}
    if reference:
        runners["reference"] = pb.reference_way()
    if compiled:
        runners["compiled"] = pb.conductor(False, compile=True)
    t = interleave(runners, device, rounds=rounds, warmup=2)
    over = (t["gcond"].median - t["bound"].median) * 1e3
    target = "<= 1.1x" + (", <= bound + 2 ms" if pb.size <= 150_000 else "")
    rows = [
        (
            "classic step / K-backward bound",
            name,
            t["gcond"],
            t["bound"],
            f"{ratio_spread(t['gcond'], t['bound'])}, {over:+.2f} ms",
            target,
        )
    ]
    if compiled:
        over_c = (t["compiled"].median - t["bound"].median) * 1e3
        rows.append(
            (
                "classic step, process compiled (inductor) / K-backward bound",
                name,
                t["compiled"],
                t["bound"],
                f"{ratio_spread(t['compiled'], t['bound'])}, {over_c:+.2f} ms",
                "(information)",
            )
        )
    if reference:
        rows.append(
            (
                "classic step / the reference's way",
                name,
                t["gcond"],
                t["reference"],
                ratio_spread(t["gcond"], t["reference"]),
                "(information)",
            )
        )
    return rows


def resolve_row(k: int, n: int, device: torch.device, rounds: int) -> Row:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=gen)
    # correlated tasks with alternating signs: many conflicting pairs
    rows = [(-1.0) ** i * 0.6 * base + torch.randn(n, generator=gen) for i in range(k)]
    stacked = {"w": torch.stack(rows).to(device)}
    prev = [torch.randn(n, generator=gen).to(device) for _ in range(k)]
    prev_stacked = {"w": torch.stack(prev)}
    ema = torch.ones(k, device=device)

    def ours() -> None:
        hist = torch.full((3,), -1, device=device)
        resolve(stacked, prev=prev_stacked, norm_ema=ema, history=hist)

    def vector() -> None:
        vector_resolve(list(stacked["w"].clone().unbind(0)), prev, [1.0] * k, deque(maxlen=3), 3)

    t = interleave({"gradfn": ours, "vector": vector}, device, rounds=rounds)
    return (
        f"resolve, K={k}, 2K iterations / pairwise vectors",
        f"n={n:.0e}",
        t["gradfn"],
        t["vector"],
        ratio_spread(t["gradfn"], t["vector"]),
        "(information)",
    )


MODELS = {
    "1.1k": ("mlp", 16, 16),
    "0.1M": ("mlp", 128, 256),
    "1.6M": ("mlp", 512, 1024),
    "10.5M": ("mlp", 3072, 2048),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models only, fewer rounds")
    parser.add_argument("--batch", type=int, default=128, help="micro-batch size (default 128)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time classic mode with its process compiled (the two smallest models)",
    )
    add_common_args(parser)
    args = parser.parse_args()
    device = setup(args)
    rounds = 5 if args.quick else 9
    stochastic = ["1.1k", "0.1M"] if args.quick else ["1.1k", "0.1M", "1.6M", "10.5M"]
    classic = ["1.1k", "0.1M"] if args.quick else ["1.1k", "0.1M", "1.6M"]
    rows: list[Row] = []
    for key in progress(stochastic, "conductor"):
        pb = Problem(MODELS[key], args.batch, device)
        name = f"{key} ({pb.size:,} params)"
        rows += stochastic_rows(name, pb, device, rounds)
        if key in classic:
            small = key in ("1.1k", "0.1M")
            rows += classic_rows(
                name, pb, device, rounds, reference=key == "1.6M", compiled=args.compile and small
            )
    rows.append(
        resolve_row(16, 100_000 if args.quick else 1_000_000, device, 3 if args.quick else 5)
    )

    print(
        f"{environment(device)}; K={K} losses, N={N} micro-batches of {args.batch}, "
        f"{rounds} interleaved rounds (median [min–max])\n"
    )
    print("| measurement | model | gradfn ms | baseline ms | ratio gradfn / baseline | target |")
    print("|---|---|---|---|---|---|")
    for what, model, ours, base, ratio, target in rows:
        print(f"| {what} | {model} | {ours.ms()} | {base.ms()} | {ratio} | {target} |")


if __name__ == "__main__":
    main()
