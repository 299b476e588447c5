"""Per-task gradients: gradfn's strategies vs one summed backward and vs the naive baseline.

Every configuration is timed side by side in one run, in interleaved rounds (median of rounds):

* ``summed``: one forward and one backward of ``Σ_k L_k`` (the cost of plain training);
* ``naive``: ``K`` separate forward + backward passes, one per task, as the reference
  implementations of SON-GOKU and GradientConductor compute per-task gradients;
* ``vmap`` / ``loop`` / ``auto``: :func:`gradfn.value_and_per_task_grads`, one shared forward;
* ``forward``: the forward of one task's loss (what ``naive`` repeats), for the ``bound`` column.

Usage::

    python -m benchmarks.per_task_grads            # full table
    python -m benchmarks.per_task_grads --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from gradfn import functional_loss, value_and_per_task_grads
from gradfn.autodiff import choose_strategy


class MLPHeads(nn.Module):
    def __init__(self, k: int, d_in: int = 256, hidden: int = 256, classes: int = 10) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.heads = nn.ModuleList([nn.Linear(hidden, classes) for _ in range(k)])


class CNNHeads(nn.Module):
    def __init__(self, k: int, classes: int = 10) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.heads = nn.ModuleList([nn.Linear(32 * 16, classes) for _ in range(k)])


def all_losses(model: nn.Module, batch) -> list[torch.Tensor]:
    x, y = batch
    h = model.trunk(x)
    return [nn.functional.cross_entropy(head(h), y[:, i]) for i, head in enumerate(model.heads)]


def one_loss(model: nn.Module, batch, i: int) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model.heads[i](model.trunk(x)), y[:, i])


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_model(name: str, model: nn.Module, batch, k: int, rounds: int, reps: int) -> dict:
    trainable = [p for p in model.parameters() if p.requires_grad]
    params, f = functional_loss(model, all_losses)

    def summed():
        torch.autograd.grad(sum(all_losses(model, batch)), trainable)

    def forward():
        with torch.enable_grad():
            one_loss(model, batch, 0)

    def naive():
        for i in range(k):
            torch.autograd.grad(one_loss(model, batch, i), trainable, allow_unused=True)

    def strategy(s):
        return lambda: value_and_per_task_grads(f, params, batch, strategy=s)

    fns = {
        "forward": forward,
        "summed": summed,
        "naive": naive,
        "vmap": strategy("vmap"),
        "loop": strategy("loop"),
        "auto": strategy("auto"),
    }
    for fn in fns.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {key: [] for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            samples[key].append(min(timed(fn) for _ in range(reps)))
    ms = {key: statistics.median(v) * 1e3 for key, v in samples.items()}
    return {"model": name, "K": k, "auto_picks": choose_strategy(params), **ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    ks = [2, 8] if args.quick else [2, 4, 8, 16]
    rounds, reps = (3, 2) if args.quick else (15, 3)
    batch_size = 64
    rows = []
    for k in ks:
        y = torch.randint(0, 10, (batch_size, k), device=dev)
        mlp = MLPHeads(k).to(dev)
        rows.append(
            bench_model("MLP", mlp, (torch.randn(batch_size, 256, device=dev), y), k, rounds, reps)
        )
        cnn = CNNHeads(k).to(dev)
        x = torch.randn(batch_size, 1, 16, 16, device=dev)
        rows.append(bench_model("CNN", cnn, (x, y), k, rounds, reps))
    print(f"device={args.device} threads={args.threads} batch={batch_size}\n")
    print(
        "| model | K | summed ms | naive ms | vmap ms | loop ms | auto ms (picks) "
        "| auto / summed | naive / auto | bound | auto / best |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        best = min(r["vmap"], r["loop"])
        # Any exact method needs K backward passes: with F one forward, naive = K·(F + B_k)
        # and the best shared-forward time is F + K·B_k = naive − (K − 1)·F.
        bound = r["naive"] / max(r["naive"] - (r["K"] - 1) * r["forward"], 1e-9)
        print(
            f"| {r['model']} | {r['K']} | {r['summed']:.2f} | {r['naive']:.2f} | {r['vmap']:.2f} "
            f"| {r['loop']:.2f} | {r['auto']:.2f} ({r['auto_picks']}) | {r['auto'] / r['summed']:.2f}x "
            f"| {r['naive'] / r['auto']:.2f}x | {bound:.2f}x | {r['auto'] / best:.2f} |"
        )
    print(
        "\nbound: the largest naive / shared-forward ratio any exact method can reach, "
        "naive / (naive − (K − 1)·forward), from the measured forward time."
    )


if __name__ == "__main__":
    main()
