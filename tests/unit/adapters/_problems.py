"""Small adapter problems shared by the adapter tests.

SON-GOKU: three scalar tasks ``a``, ``b``, ``c`` on one trunk (``c`` opposes ``a``) and their
per-step batches. GradientConductor: three losses on a two-output model and a seeded data provider.
"""

from __future__ import annotations

import torch

from gradfn.adapters import TaskSpec


def _task(k: int, sign: float):
    def loss(m, batch):
        x, y = batch
        return ((m(x, k) - sign * y) ** 2).mean()

    return loss


def abc_specs() -> list[TaskSpec]:
    return [
        TaskSpec("a", _task(0, 1.0)),
        TaskSpec("b", _task(1, 0.5)),
        TaskSpec("c", _task(2, -1.0)),
    ]


def abc_batches(n: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(8, 6, generator=g)
        y = x.sum(dim=1)
        out.append({name: (x, y) for name in "abc"})
    return out


GC_LOSSES = {
    "fit": lambda out, y: ((out[:, 0] - y) ** 2).mean(),
    "anti": lambda out, y: ((out[:, 1] + y) ** 2).mean(),
    "mix": lambda out, y: ((out.sum(dim=1) - 0.3 * y) ** 2).mean(),
}
GC_LAMBDAS = {"fit": 1.0, "anti": 0.7, "mix": 0.5}


def gc_provider(step: int):
    g = torch.Generator().manual_seed(100 + step)

    def provider():
        x = torch.randn(4, 5, generator=g)
        return x, x[:, 0] - x[:, 1]

    return provider
