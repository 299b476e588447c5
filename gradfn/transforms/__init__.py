"""Gradient transforms (layer 3): THE ``(init, update)`` protocol and the generic transforms.

``update(state, updates, params=None, **extra) -> (state, updates)``; :func:`chain` composes
transforms, :func:`apply_if_finite` skips non-finite updates. An aggregator
(:mod:`gradfn.aggregators`) is a gradient transform whose input is task-stacked.
"""

from gradfn.transforms._base import EmptyState, GradientTransform, chain, identity, stateless
from gradfn.transforms._clipping import cap_factors, norm_cap, scale_rows, task_norms
from gradfn.transforms._conditionality import (
    ApplyIfFiniteState,
    apply_if_finite,
    skip_if_nonfinite,
)
from gradfn.transforms._moments import (
    MomentumState,
    NormEmaState,
    ema_of_norms,
    momentum,
    norm_ema,
)
from gradfn.transforms._trust_ratio import lion, sign_trust_ratio

__all__ = [
    "ApplyIfFiniteState",
    "EmptyState",
    "GradientTransform",
    "MomentumState",
    "NormEmaState",
    "apply_if_finite",
    "cap_factors",
    "chain",
    "ema_of_norms",
    "identity",
    "lion",
    "momentum",
    "norm_cap",
    "norm_ema",
    "scale_rows",
    "sign_trust_ratio",
    "skip_if_nonfinite",
    "stateless",
    "task_norms",
]
