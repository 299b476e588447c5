"""One Adam step on a ``(K,)`` vector (Kingma & Ba 2015, arXiv:1412.6980), as
``torch.optim.Adam`` with L2 ``weight_decay`` computes it, tensor-only (no host reads)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["AdamMoments", "adam_step"]


class AdamMoments(NamedTuple):
    """``exp_avg``, ``exp_avg_sq`` (``(K,)``) and ``step`` (0-d int64)."""

    exp_avg: Tensor
    exp_avg_sq: Tensor
    step: Tensor


def adam_step(
    x: Tensor,
    grad: Tensor,
    moments: AdamMoments,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> tuple[Tensor, AdamMoments]:
    """``(x', moments')``: ``g = grad + wd·x``, ``m, v`` their EMAs, ``x' = x − lr·m̂/(√v̂ + eps)``
    with the bias corrections ``1 − β^t``."""
    b1, b2 = betas
    g = grad + weight_decay * x
    t = moments.step + 1
    m = b1 * moments.exp_avg + (1 - b1) * g
    v = b2 * moments.exp_avg_sq + (1 - b2) * g * g
    tf = t.to(x.dtype)
    denom = torch.sqrt(v) / torch.sqrt(1 - b2**tf) + eps
    return x - (lr / (1 - b1**tf)) * m / denom, AdamMoments(m, v, t)
