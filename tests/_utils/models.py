"""One small trunk-plus-heads model family for every ``nn.Module`` test.

``TrunkHeads(d_in, hidden, heads, out)``: a shared trunk ``Linear(d_in, hidden) [→ BatchNorm1d] →
Tanh`` and ``heads`` linear heads ``Linear(hidden, out)``, with optional extras:

* ``frozen_input``: a ``Linear(d_in, d_in)`` before the trunk with ``requires_grad=False``;
* ``partial=n``: a ``Linear(hidden, hidden)`` (``pair``) that only heads ``0 .. n-1`` read;
* ``dropout``: a ``Dropout`` after the trunk;
* ``unused``: a ``Linear(2, 2)`` no output depends on;
* ``double_last_head``: the last head in float64 (its input is cast);
* ``dtype``: the dtype of every other layer.

The weights are drawn from a local ``torch.Generator`` seeded with ``seed``, with PyTorch's own
``nn.Linear`` initialisation, layer after layer in registration order and in float32 before the
cast to ``dtype``: the very numbers of ``torch.manual_seed(seed)`` followed by building the same
layers, while the global random state is left untouched.

``model(x)`` is the concatenation of the heads' outputs ``(B, heads · out)``; ``model(x, k)``
runs head ``k`` only (squeezed to ``(B,)`` when ``out == 1``); ``model.head_outputs(x)`` lists
every head's ``(B, out)`` output in its own dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["TrunkHeads"]


class TrunkHeads(nn.Module):
    """A shared trunk and linear heads (module docstring)."""

    def __init__(
        self,
        d_in: int = 4,
        hidden: int = 8,
        heads: int = 3,
        out: int = 1,
        *,
        batchnorm: bool = False,
        frozen_input: bool = False,
        partial: int = 0,
        dropout: float = 0.0,
        unused: bool = False,
        double_last_head: bool = False,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.num_heads, self.out, self.partial = heads, out, partial
        with torch.random.fork_rng(devices=[]):  # the layers' own init is overwritten below
            if frozen_input:
                self.frozen = nn.Linear(d_in, d_in)
            layers: list[nn.Module] = [nn.Linear(d_in, hidden)]
            if batchnorm:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(nn.Tanh())
            self.trunk = nn.Sequential(*layers)
            if partial:
                self.pair = nn.Linear(hidden, hidden)
            self.drop = nn.Dropout(dropout) if dropout else None
            self.heads = nn.ModuleList(nn.Linear(hidden, out) for _ in range(heads))
            if unused:
                self.unused = nn.Linear(2, 2)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):  # nn.Linear.reset_parameters, local generator
                    nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=gen)
                    bound = 1.0 / math.sqrt(module.in_features)
                    nn.init.uniform_(module.bias, -bound, bound, generator=gen)
        self.to(dtype)
        if frozen_input:
            self.frozen.requires_grad_(False)
        if double_last_head:
            self.heads[-1].double()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's output ``(B, hidden)``."""
        if hasattr(self, "frozen"):
            x = self.frozen(x)
        h = self.trunk(x)
        return h if self.drop is None else self.drop(h)

    def _head(self, h: torch.Tensor, k: int) -> torch.Tensor:
        if k < self.partial:
            h = torch.tanh(self.pair(h))
        head = self.heads[k]
        return head(h.to(head.weight.dtype))

    def head_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every head's output ``(B, out)``, in the head's dtype."""
        h = self.features(x)
        return [self._head(h, k) for k in range(self.num_heads)]

    def forward(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        if k is None:
            return torch.cat(self.head_outputs(x), dim=1)
        y = self._head(self.features(x), k)
        return y.squeeze(-1) if self.out == 1 else y
