"""SON-GOKU test problems with known gradients: planted task clusters and linear losses."""

from __future__ import annotations

import math

import torch

D = 6


def planted(k_per_group=2, groups=3, seed=0, noise=0.05):
    """Tasks in ``groups`` clusters: aligned inside a cluster, opposed (120°) across clusters."""
    g = torch.Generator().manual_seed(seed)
    angles = [2 * math.pi * c / groups for c in range(groups)]
    means = torch.zeros(groups, D, dtype=torch.float64)
    for c, a in enumerate(angles):
        means[c, 0], means[c, 1] = math.cos(a), math.sin(a)
    labels = [c for c in range(groups) for _ in range(k_per_group)]
    dirs = torch.stack(
        [means[c] + noise * torch.randn(D, generator=g, dtype=torch.float64) for c in labels]
    )
    return dirs, labels


def linear_loss(dirs):
    """L_k(params, batch) = <dirs_k + batch_k, w> + ½‖head_k‖²: ∇_w L_k = dirs_k + batch_k."""
    k = dirs.shape[0]

    def loss_fn(params, batch):
        w = params["w"]
        return torch.stack(
            [
                (dirs[i] + batch[i]) @ w + 0.5 * (params[f"h{i}"] ** 2).sum() * (1 + i)
                for i in range(k)
            ]
        )

    return loss_fn


def make_params(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = {"w": torch.randn(D, generator=g, dtype=torch.float64)}
    for i in range(k):
        p[f"h{i}"] = torch.randn(2, generator=g, dtype=torch.float64)
    return p


def batches(k, n, seed=1, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(k, D, generator=g, dtype=torch.float64) for _ in range(n)]


def partition(state):
    m = int(state.num_groups)
    return {frozenset(torch.nonzero(state.groups[c]).flatten().tolist()) for c in range(m)}
