"""IMTL-L, the loss half of Impartial Multi-Task Learning (Liu et al. 2021, ICLR,
*Towards Impartial Multi-task Learning*, Sec. 3.2), with learned scales ``s_k``.

The step's loss is ``Σ_k e^{s_k} L_k − s_k``: weights ``w_k = e^{s_k}`` and the penalty
``−Σ_k s_k``. At the optimum over ``s`` (``e^{s_k} L_k = 1``) every scaled loss equals 1. ``s``
starts at 0 (``init_params(K)``) and is trained by the user's optimizer with the model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradfn._internal.checks import check_finite
from gradfn.weighting._base import LossWeighting
from gradfn.weighting._learned import learned

__all__ = ["imtl_l"]


def imtl_l(*, init: float = 0.0) -> LossWeighting:
    """The IMTL-L :class:`LossWeighting` (learned); ``init``: the initial ``s_k``."""

    def weights(s: Tensor) -> Tensor:
        return torch.exp(s)

    def penalty(s: Tensor) -> Tensor:
        return -s.sum()

    return learned("imtl_l", weights, penalty, check_finite("init", init))
