"""GradientConductor test problem: a linear model, two losses, micro-batches, autograd oracles."""

from __future__ import annotations

import torch

from gradfn.algorithms import conductor

LAMBDAS = [1.0, 0.5]


def make_params(seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 4, generator=gen) * scale,
        "b": torch.randn(3, generator=gen) * scale,
    }


def make_batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 4, generator=gen), torch.randn(5, 3, generator=gen)) for _ in range(n)]


def two_losses(p, batch):
    x, y = batch
    out = x @ p["w"].T + p["b"]
    return [((out - y) ** 2).mean(), ((out[:, 0] + 2 * y[:, 1]) ** 2).mean()]


def grad_of(task, p, batch):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
    loss = two_losses(leaves, batch)[task]
    gs = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, gs, strict=True)), float(loss.detach())


def conflicting_losses(p, batch):
    x, y = batch
    out = x @ p["w"].T + p["b"]
    return [((out - y) ** 2).mean(), ((out + y) ** 2).mean() * 0.5]


class Counting:
    """A loss function that counts its forward calls and the batches it saw."""

    def __init__(self):
        self.calls = 0
        self.seen = []

    def __call__(self, p, batch):
        self.calls += 1
        self.seen.append(id(batch))
        return two_losses(p, batch)


def accumulate(loss_fn, params, microbatches, lambdas=LAMBDAS, n=None, **options):
    """``(A, losses, raw_losses)`` of one accumulation cycle."""
    n = len(microbatches) if n is None else n
    tx = conductor(loss_fn, lambdas, accumulation_steps=n, **options)
    cycle = tx.accumulate(params, microbatches)
    return cycle.grads, cycle.losses, cycle.raw_losses
