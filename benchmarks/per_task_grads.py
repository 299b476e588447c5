"""Per-task gradients: gradfn's strategies vs one summed backward, the naive baseline and the
shared-forward bound.

Every configuration is timed side by side in one run, in interleaved rounds
(:func:`benchmarks._common.interleave`; median and spread over the rounds):

* ``summed``: one forward and one backward of ``Σ_k L_k`` (the cost of plain training);
* ``naive``: ``K`` separate forward + backward passes, one per task, as the reference
  implementations of SON-GOKU and GradientConductor compute per-task gradients;
* ``shared``: one forward and ``K`` backward passes on the retained graph, the gradients
  dropped (no copy, no output): the bound ``naive / shared`` on what sharing the forward can gain;
* ``shared+J``: the same, each task's gradients copied into a fresh ``(K, *shape)`` output per
  parameter as they come: the least any method that returns the task-stacked ``J`` does on the
  CPU (``bound+J``);
* ``vmap`` / ``loop`` / ``auto``: :func:`gradfn.value_and_per_task_grads`, one shared forward.

Models: ``MLP`` (256 → 256 → 256 trunk, batch 64), ``CNN`` (two 3×3 convolutions, batch 64) at
``K`` ∈ {2, 4, 8, 16}, and ``MLP-L`` (512 → 1024 → 1024 → 256 trunk, batch 256) at ``K = 8``;
``K`` linear heads of 10 classes.

Usage::

    python -m benchmarks.per_task_grads            # full table
    python -m benchmarks.per_task_grads --quick    # a smoke run
"""

from __future__ import annotations

import argparse
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
from gradfn import functional_loss, value_and_per_task_grads
from gradfn.autodiff import choose_strategy


class MLPHeads(nn.Module):
    def __init__(self, k: int, d_in: int = 256, hidden: int = 256, classes: int = 10) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.heads = nn.ModuleList([nn.Linear(hidden, classes) for _ in range(k)])


class LargeMLPHeads(nn.Module):
    """512 → 1024 → 1024 → 256 trunk (1.8 M parameters), ``K`` heads of 10 classes."""

    def __init__(self, k: int, classes: int = 10) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(512, 1024),
            nn.ReLU(),
            nn.Linear(1024, 1024),
            nn.ReLU(),
            nn.Linear(1024, 256),
            nn.ReLU(),
        )
        self.heads = nn.ModuleList([nn.Linear(256, classes) for _ in range(k)])


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


def runners(model: nn.Module, batch, k: int) -> dict[str, Callable[[], object]]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    params, f = functional_loss(model, all_losses)

    def summed() -> None:
        torch.autograd.grad(sum(all_losses(model, batch)), trainable)

    def naive() -> None:
        for i in range(k):
            torch.autograd.grad(one_loss(model, batch, i), trainable, allow_unused=True)

    def shared() -> None:
        losses = all_losses(model, batch)
        for i in range(k):
            torch.autograd.grad(losses[i], trainable, allow_unused=True, retain_graph=i < k - 1)

    def shared_j() -> list[torch.Tensor]:
        losses = all_losses(model, batch)
        out = [torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device) for p in trainable]
        for i in range(k):
            row = torch.autograd.grad(
                losses[i], trainable, allow_unused=True, retain_graph=i < k - 1
            )
            for o, g in zip(out, row, strict=True):
                if g is not None:
                    o[i].copy_(g)
        return out

    def strategy(s: str) -> Callable[[], object]:
        return lambda: value_and_per_task_grads(f, params, batch, strategy=s)

    return {
        "summed": summed,
        "naive": naive,
        "shared": shared,
        "shared+J": shared_j,
        "vmap": strategy("vmap"),
        "loop": strategy("loop"),
        "auto": strategy("auto"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="K in {2, 8}, few rounds")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (11)")
    add_common_args(parser)
    args = parser.parse_args()
    device = setup(args)
    torch.manual_seed(0)
    ks = [2, 8] if args.quick else [2, 4, 8, 16]
    rounds = args.rounds or (3 if args.quick else 11)
    configs: list[tuple[str, int]] = [(m, k) for k in ks for m in ("MLP", "CNN")]
    configs.append(("MLP-L", 8))
    print(f"{environment(device)}, {rounds} interleaved rounds\n")
    print(
        "| model | K | naive ms | auto ms (picks) | naive / auto | bound: naive / shared "
        "| auto / bound | auto / bound+J | vmap / auto | loop / auto | auto / summed |"
    )
    print("|---" * 11 + "|")
    for name, k in progress(configs, "per_task_grads"):
        bs = 256 if name == "MLP-L" else 64
        y = torch.randint(0, 10, (bs, k), device=device)
        if name == "MLP":
            model: nn.Module = MLPHeads(k)
            x = torch.randn(bs, 256, device=device)
        elif name == "MLP-L":
            model = LargeMLPHeads(k)
            x = torch.randn(bs, 512, device=device)
        else:
            model = CNNHeads(k)
            x = torch.randn(bs, 1, 16, 16, device=device)
        model.to(device)
        run = runners(model, (x, y), k)
        t: dict[str, Timing] = interleave(run, device, rounds=rounds, warmup=2)
        picks = choose_strategy(functional_loss(model, all_losses)[0])
        print(
            f"| {name} | {k} | {t['naive'].ms()} | {t['auto'].ms()} ({picks}) "
            f"| {ratio_spread(t['naive'], t['auto'])} | {ratio_spread(t['naive'], t['shared'])} "
            f"| {ratio_spread(t['shared'], t['auto'])} | {ratio_spread(t['shared+J'], t['auto'])} "
            f"| {ratio_spread(t['vmap'], t['auto'])} "
            f"| {ratio_spread(t['loop'], t['auto'])} | {ratio_spread(t['auto'], t['summed'])} |",
            flush=True,
        )
    print(
        "\nnaive / auto: speed-up over K separate passes. bound: naive / shared, the most any "
        "exact method sharing the forward can reach. auto / bound = shared / auto: the fraction "
        "of the bound reached (1.00 = at the bound); auto / bound+J the same against the bound with "
        "the output J written. vmap / auto, loop / auto > 1: auto faster."
    )


if __name__ == "__main__":
    main()
