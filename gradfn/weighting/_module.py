"""``WeightedLoss``: a loss weighting for an ``nn.Module`` training loop (a thin stateful shell)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optree
import torch
from torch import Tensor, nn

from gradfn.weighting._base import LossWeighting, weighted_loss
from gradfn.weighting._linear_norms import LinearCapture, is_plain_linear

__all__ = ["WeightedLoss"]


class WeightedLoss(nn.Module):
    """Holds a :class:`LossWeighting`'s state (and, for a learned one, its ``(K,)`` parameter
    ``s`` as ``nn.Parameter``: pass ``WeightedLoss.parameters()`` to the optimizer with the
    model's). ``forward(losses) -> Σ_k w_k L_k (+ penalty)``; ``weights``: the last step's.
    ``state_dict()`` holds the state's tensors too (``load_state_dict`` restores them).

    Args:
        weighting: e.g. ``weighting.famo()``.
        num_tasks: ``K``.
        layer: GradNorm's shared layer (an ``nn.Module`` or its parameters); else None. Or
            pass ``layer=`` to each call, e.g. the shared features of the step. An
            ``nn.Linear`` module gets a :class:`LinearCapture` (a forward hook): its norms come
            from its output gradients and inputs, no weight gradient formed; pass its
            parameters (``list(layer.parameters())``) for ``autograd.grad`` to them instead.
        device: where the state lives.
    """

    def __init__(
        self,
        weighting: LossWeighting,
        num_tasks: int,
        *,
        layer: Any = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(weighting, LossWeighting):
            raise TypeError(f"WeightedLoss: `weighting` must be a LossWeighting, got {weighting!r}")
        self.weighting = weighting
        self.state = weighting.init(num_tasks, device=device)
        # the user's layer, not a submodule: its parameters already reach the optimizer (and
        # the checkpoint) through the model, and must not a second time through this module
        object.__setattr__(self, "layer", layer)
        self.capture: LinearCapture | None = None
        if weighting.name == "gradnorm" and is_plain_linear(layer):
            self.capture = LinearCapture(layer)
        self.s: nn.Parameter | None = None
        if weighting.init_params is not None:
            self.s = nn.Parameter(weighting.init_params(num_tasks, device=device).detach())
        self.weights: Tensor | None = None

    def forward(self, losses: Tensor | Sequence[Tensor], layer: Any = None) -> Tensor:
        """``layer``: GradNorm's layer for this step only (e.g. this step's shared features)."""
        own = self.layer if self.capture is None else self.capture
        params = self.s if self.s is not None else own if layer is None else layer
        self.state, total, w = weighted_loss(self.weighting, self.state, losses, params)
        self.weights = w.detach()
        return total

    def get_extra_state(self) -> Any:
        """The state's tensors, as a list (plain tensors load with ``weights_only=True``)."""
        return list(optree.tree_leaves(self.state, none_is_leaf=False))

    def set_extra_state(self, state: Any) -> None:
        leaves, spec = optree.tree_flatten(self.state, none_is_leaf=False)
        if not isinstance(state, list) or len(state) != len(leaves):
            raise ValueError(
                f"WeightedLoss: a saved state of {len(leaves)} tensors was expected, got {state!r}"
            )
        self.state = optree.tree_unflatten(
            spec, [t.to(x.device) for t, x in zip(state, leaves, strict=True)]
        )
