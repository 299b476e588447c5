"""Optax-style gradient transforms (gcond spec §2.3 steps 1–2 and §2.8).

A :class:`GradientTransform` is a pure pair

* ``init(params) -> state``
* ``update(state, updates, params=None) -> (state, updates)``

with the state a NamedTuple of tensors (counters are 0-d int64 tensors). :func:`chain` composes them
left to right. Everything is tensor-only (no host syncs) and traces under
``torch.compile(fullgraph=True)``.

Provided: :func:`norm_cap` (the reference's per-loss clip), :func:`norm_ema` (EMA of update norms),
:func:`momentum` (bias-corrected EMA, the reference's non-Lion path), :func:`sign_trust_ratio` and
:func:`lion` (the reference's "Lion" branch: sign of the bias-corrected momentum scaled per tensor by a
clipped trust ratio).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from gradfn import tree

__all__ = [
    "EmptyState",
    "GradientTransform",
    "MomentumState",
    "NormEmaState",
    "cap_factors",
    "chain",
    "lion",
    "momentum",
    "norm_cap",
    "norm_ema",
    "sign_trust_ratio",
    "task_norms",
]

PyTree = Any


class GradientTransform(NamedTuple):
    """``init(params) -> state``; ``update(state, updates, params=None) -> (state, updates)``."""

    init: Callable[[PyTree], Any]
    update: Callable[..., tuple[Any, PyTree]]


class EmptyState(NamedTuple):
    """State of a stateless transform."""


class NormEmaState(NamedTuple):
    ema: Tensor  # () or (K,) float32


class MomentumState(NamedTuple):
    count: Tensor  # 0-d int64: number of updates t
    mu: PyTree  # the first moment M, in the transform's storage dtype


def _check_beta(beta: float, name: str) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1), got {beta!r}")
    return float(beta)


def _check_positive(x: float, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0:
        raise ValueError(f"`{name}` must be a number > 0, got {x!r}")
    return float(x)


def chain(*transforms: GradientTransform) -> GradientTransform:
    """Apply ``transforms`` left to right; the state is the tuple of their states."""
    for t in transforms:
        if not isinstance(t, GradientTransform):
            raise TypeError(f"chain: expected GradientTransforms, got {type(t).__name__}")

    def init(params: PyTree) -> tuple:
        return tuple(t.init(params) for t in transforms)

    def update(state: tuple, updates: PyTree, params: PyTree = None) -> tuple[tuple, PyTree]:
        new = []
        for t, s in zip(transforms, state, strict=True):
            s, updates = t.update(s, updates, params)
            new.append(s)
        return tuple(new), updates

    return GradientTransform(init, update)


def task_norms(updates: PyTree, per_task: bool) -> Tensor:
    """Global L2 norm (float32): one 0-d value, or ``(K,)`` over the leading axis if ``per_task``."""
    if not per_task:
        return tree.tree_norm(updates)
    ls = tree.leaves(updates)
    k = ls[0].shape[0]
    sq = torch.stack([(x.reshape(k, -1).float() ** 2).sum(1) for x in ls]).sum(0)
    return torch.sqrt(sq)


def cap_factors(norms: Tensor, max_norm: float | None, eps: float) -> Tensor:
    """The reference's clip factor: ``cap/(||g||+eps)`` where ``||g|| > cap``, else 1."""
    if max_norm is None:
        return torch.ones_like(norms)
    return torch.where(norms > max_norm, max_norm / (norms + eps), torch.ones_like(norms))


def _scale(updates: PyTree, factors: Tensor, per_task: bool) -> PyTree:
    if not per_task:
        return tree.tree_map(lambda x: x * factors.to(x.dtype), updates)
    return tree.tree_map(
        lambda x: x * factors.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1)), updates
    )


def norm_cap(max_norm: float, *, per_task: bool = False, eps: float = 1e-8) -> GradientTransform:
    """Clip the global norm to ``max_norm``: ``u ← u·max_norm/(||u||+eps)`` if ``||u|| > max_norm``
    (never scales up). ``per_task``: each slice of the leading task axis separately (spec §2.3.2)."""
    cap = _check_positive(max_norm, "max_norm")

    def init(params: PyTree) -> EmptyState:
        return EmptyState()

    def update(state: EmptyState, updates: PyTree, params: PyTree = None):
        return state, _scale(
            updates, cap_factors(task_norms(updates, per_task), cap, eps), per_task
        )

    return GradientTransform(init, update)


def norm_ema(
    beta: float = 0.95,
    *,
    num_tasks: int | None = None,
    initial: float = 1.0,
    eps: float = 1e-8,
) -> GradientTransform:
    """Track ``e ← max(β·e + (1−β)·||u||, eps)`` (spec §2.3.1; starts at ``initial``, no bias
    correction); the updates pass through unchanged. ``num_tasks``: one EMA per slice of the leading
    task axis (state ``(K,)``), else one global EMA (state ``()``)."""
    beta = _check_beta(beta, "beta")

    def init(params: PyTree) -> NormEmaState:
        device = tree.leaves(params)[0].device
        shape = () if num_tasks is None else (num_tasks,)
        return NormEmaState(torch.full(shape, float(initial), device=device))

    def update(state: NormEmaState, updates: PyTree, params: PyTree = None):
        norms = task_norms(updates, num_tasks is not None)
        ema = torch.clamp(beta * state.ema + (1.0 - beta) * norms, min=eps)
        return NormEmaState(ema), updates

    return GradientTransform(init, update)


def momentum(
    beta: float = 0.85, *, bias_correction: bool = True, dtype: torch.dtype = torch.float32
) -> GradientTransform:
    """First-moment EMA (spec §2.8): ``t ← t+1``, ``M ← β·M + (1−β)·u``, output ``M/(1−β^t)``
    (``M`` without ``bias_correction``). ``M`` is stored in ``dtype`` (``torch.bfloat16``
    reproduces the reference's storage); the output has that dtype too."""
    beta = _check_beta(beta, "beta")

    def init(params: PyTree) -> MomentumState:
        leaf0 = tree.leaves(params)[0]
        count = torch.zeros((), dtype=torch.int64, device=leaf0.device)
        return MomentumState(count, tree.tree_zeros_like(params, dtype=dtype))

    def _ema(m: Tensor, u: Tensor) -> Tensor:
        # β·m + (1−β)·u in one pass (lerp from u towards m by β)
        if m.dtype == u.dtype == dtype:
            return torch.lerp(u, m, beta)
        return torch.lerp(u.float(), m.float(), beta).to(dtype)

    def update(state: MomentumState, updates: PyTree, params: PyTree = None):
        count = state.count + 1
        mu = optree.tree_map(_ema, state.mu, updates)
        if bias_correction:
            bc = 1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), count).float()
            out = tree.tree_map(lambda m: (m.float() / bc).to(dtype), mu)
        else:
            out = mu
        return MomentumState(count, mu), out

    return GradientTransform(init, update)


def sign_trust_ratio(
    coef: float = 1e-4, clip: float = 100.0, *, eps: float = 1e-8
) -> GradientTransform:
    """Per tensor: ``sign(u)·τ·coef`` with ``τ = min(||p||/||u||, clip)`` if both norms are
    ``>= eps``, else ``min(1, clip)`` (spec §2.8, the reference's Lion branch). Needs ``params``."""
    coef = _check_positive(coef, "coef")

    def init(params: PyTree) -> EmptyState:
        return EmptyState()

    def one(u: Tensor, p: Tensor) -> Tensor:
        pn = torch.linalg.vector_norm(p.float())
        un = torch.linalg.vector_norm(u.float())
        ok = (pn >= eps) & (un >= eps)
        tau = torch.where(ok, pn / torch.where(ok, un, torch.ones_like(un)), torch.ones_like(un))
        tau = torch.clamp(tau, max=clip)
        return (torch.sign(u.float()) * tau * coef).to(u.dtype)

    def update(state: EmptyState, updates: PyTree, params: PyTree = None):
        if params is None:
            raise ValueError("sign_trust_ratio: `params` is required (the trust ratio uses ||p||)")
        return state, optree.tree_map(one, updates, params)

    return GradientTransform(init, update)


def lion(
    beta: float = 0.85,
    coef: float = 1e-4,
    clip: float = 100.0,
    *,
    eps: float = 1e-8,
    dtype: torch.dtype = torch.float32,
) -> GradientTransform:
    """The reference's ``use_lion=True`` path: bias-corrected :func:`momentum`, then
    :func:`sign_trust_ratio` on ``M̂`` (spec §2.8; not the two-β Lion of the literature)."""
    return chain(momentum(beta, dtype=dtype), sign_trust_ratio(coef, clip, eps=eps))
