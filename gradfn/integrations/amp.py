"""Loss scaling for mixed precision (``torch.amp.GradScaler``), shared by both algorithms.

A transform that takes ``loss_scale`` (a 0-d tensor ``s``) differentiates ``s · L_k`` (so small
half-precision gradients do not underflow in the backward) and divides the gradients by ``s`` in
float32 right after, before any statistic or decision: the state and the returned gradient are
always unscaled. The adapters then write ``p.grad = s · g`` so that ``scaler.step(optimizer)``
unscales it exactly once (``s`` is a power of two: both products are exact).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch
from torch import Tensor

from gradfn.typing import PyTree

__all__ = ["poison_like", "scale_losses", "unscale"]


def scale_losses(loss_fn: Callable[..., Any], scale: Tensor | None) -> Callable[..., Any]:
    """``loss_fn`` with every loss (each tensor leaf of its output) multiplied by ``scale``.

    Identity for ``scale=None``.
    """
    if scale is None:
        return loss_fn

    def scaled(*args: Any, **kwargs: Any) -> Any:
        return optree.tree_map(lambda x: x * scale, loss_fn(*args, **kwargs))

    return scaled


def unscale(tree: PyTree, scale: Tensor | None) -> PyTree:
    """Every leaf divided by ``scale``, computed in float32 (or wider), returned in its dtype."""
    if scale is None:
        return tree

    def one(x: Tensor) -> Tensor:
        wide = torch.promote_types(x.dtype, torch.float32)
        return (x.to(wide) / scale.to(device=x.device, dtype=wide)).to(x.dtype)

    return optree.tree_map(one, tree)


def poison_like(p: Tensor) -> Tensor:
    """A ``+inf`` gradient for ``p``: written on a skipped step so that ``scaler.step`` skips the
    optimizer step and ``scaler.update`` lowers the scale, as after an overflowing backward."""
    return torch.full_like(p, float("inf"))
