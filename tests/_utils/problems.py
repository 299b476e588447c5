"""Tiny functional problems shared by several test files: a tanh trunk and three linear heads."""

from __future__ import annotations

import torch

__all__ = ["fn_batch", "fn_loss", "fn_params"]


def fn_loss(params, batch):
    """Three task losses from one shared forward: ``((tanh(x Wᵀ) h_k − y_k)²).mean()``."""
    x, ys = batch
    h = torch.tanh(x @ params["trunk"].T)
    return [((h @ params["heads"][k] - ys[:, k]) ** 2).mean() for k in range(3)]


def fn_params():
    g = torch.Generator().manual_seed(3)
    return {"trunk": torch.randn(8, 5, generator=g), "heads": torch.randn(3, 8, generator=g)}


def fn_batch(seed, bad=None, task=1):
    """A batch of 6; ``bad`` (NaN or inf) poisons the targets of ``task``."""
    g = torch.Generator().manual_seed(seed)
    x, ys = torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)
    if bad is not None:
        ys[:, task] = bad
    return x, ys
