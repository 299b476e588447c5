"""Uncertainty weighting (Kendall et al. 2018, *Multi-Task Learning Using Uncertainty to Weigh
Losses*, arXiv:1705.07115, Eqs. 7 and 10), with learned log-variances ``s_k = log σ_k²``.

The step's loss is ``Σ_k c·exp(−s_k) L_k + d·s_k``, i.e. weights ``w_k = c·exp(−s_k)`` and the
penalty ``d·Σ_k s_k``:

* ``kind="simplified"`` (default; the form most re-implementations use): ``c = 1, d = 1``;
* ``kind="regression"`` (Eq. 7, a Gaussian likelihood; LibMTL's ``UW``): ``c = ½, d = ½``;
* ``kind="classification"`` (Eq. 10, a scaled softmax): ``c = 1, d = ½``.

At the optimum over ``s`` (``∂/∂s_k = 0``), ``w_k L_k = d`` for every task: each weighted loss
is the same constant, whatever the task's scale. ``s`` is a parameter: make it with
``init_params(K)`` and add it to the optimizer (``weighted_loss`` adds the penalty).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradfn._internal.checks import check_choice, check_finite
from gradfn.weighting._base import LossWeighting
from gradfn.weighting._learned import learned

__all__ = ["KINDS", "uncertainty"]

KINDS = {"simplified": (1.0, 1.0), "regression": (0.5, 0.5), "classification": (1.0, 0.5)}


def uncertainty(*, kind: str = "simplified", init: float = 0.0) -> LossWeighting:
    """The uncertainty :class:`LossWeighting` (learned); ``init``: the initial ``s_k``."""
    check_choice("kind", kind, tuple(KINDS))
    c, d = KINDS[kind]

    def weights(s: Tensor) -> Tensor:
        return c * torch.exp(-s)

    def penalty(s: Tensor) -> Tensor:
        return d * s.sum()

    return learned("uncertainty", weights, penalty, check_finite("init", init))
