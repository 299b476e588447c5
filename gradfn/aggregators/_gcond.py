"""GCond's conflict resolution (GradientConductor, arXiv:2509.07252) as an aggregator.

Wraps :func:`gradfn.conflict.resolve_gramian`: the resolution tracks ``g_i = Σ_j C_ij g⁰_j`` in
K-space, and the sum of the resolved gradients is ``Σ_j w_j g⁰_j`` with ``w = 1ᵀC``. This is the
stateless use (no arbitrator history, norm EMAs or previous-step stability); the accumulation,
momentum and trust ratio of GradientConductor live in its own transform.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from gradfn.aggregators._base import check_active, check_gram, finish, from_weighting, restrict
from gradfn.conflict import resolve_gramian

__all__ = ["gcond", "gcond_weights"]


def gcond_weights(
    gram: Tensor,
    *,
    thresholds: Sequence[float] = (-0.8, -0.5, 0.0),
    active: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """Weights of the summed GCond-resolved gradients.

    ``thresholds`` = (critical, main, weak); further keywords go to
    :func:`gradfn.conflict.resolve_gramian` (``rule``, ``max_iters``, ``eps``, ...). Inactive tasks
    (``active``) are neither resolved nor summed.
    """
    k = check_gram(gram, "gcond_weights")
    check_active(active, k, "gcond_weights")
    g, a = restrict(gram, active)
    result = resolve_gramian(g, thresholds, **kwargs)
    return finish(result.weights.to(g.dtype), gram, a)


gcond = from_weighting(gcond_weights, "gcond")
gcond.__doc__ = """GCond resolution on task-stacked ``grads``: ``Aggregated(Σ_i g_i, w)`` with the
``g_i`` resolved; keywords as :func:`gcond_weights` plus an optional precomputed ``gram``."""
