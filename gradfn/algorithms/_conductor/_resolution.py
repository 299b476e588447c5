"""GCond's resolution as a stateful aggregator over the accumulated ``A_k`` (arXiv:2509.07252).

``update(state, A, params, *, gram=G(A), cross=X)`` (``X_mk = <A_m, p_k>`` with the previous
``p_k``; both computed here when not given) works in ``K×K`` space on the Gramian of the ``A_k``:

1. norm EMA ``e_k ← max(β e_k + (1−β)‖A_k‖, eps)`` (:func:`gradfn.transforms.ema_of_norms`),
   with ``K ≥ 2`` only (it feeds the arbitrator; one loss leaves it at 1.0, as the reference does);
2. per-loss cap ``s_k = cap/(‖A_k‖+eps)`` where ``‖A_k‖ > cap`` (:func:`gradfn.transforms.cap_factors`),
   applied to the Gramian as ``s sᵀ``, never to the rows;
3. conflict resolution in coefficient space (:func:`gradfn.conflict.resolve_gramian`), the
   arbitrator reading the EMAs, the winner ring and the cross-Gramian with the previous ``A_k``;
4. ``G = Σ_k w_k s_k A_k`` with ``w = 1ᵀC``: one weighted sum over the rows.

With ``config.resolves_vectors`` (bfloat16 accumulators by default) steps 2–4 run instead as the
reference implementation's vector passes on a copy of the ``A_k`` (:func:`_update_vectors`,
:func:`gradfn.conflict.resolve_vectors`): the cap and every projection rounded to the buffers'
dtype, and ``G`` the float32 sum of the resolved rows.

The state holds the algorithm's memory (norm EMAs, previous gradients, winner ring) and the
diagnostics of the last resolution it applied.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradfn import tree
from gradfn.algorithms._conductor._config import ConductorConfig
from gradfn.conflict import (
    ResolveResult,
    gramian_and_cross,
    init_history,
    resolve_gramian,
    resolve_vectors,
    vector_dots,
)
from gradfn.transforms import GradientTransform, cap_factors, ema_of_norms
from gradfn.typing import PyTree

__all__ = ["ResolutionState", "resolution"]


class ResolutionState(NamedTuple):
    """``norm_ema`` (K,); ``prev`` (task-stacked) and ``prev_sq_norms`` (K,): last cycle's per-loss
    gradients for the arbitrator's stability (raw, or capped and projected); ``history`` (W,)
    int64 winner ring. Diagnostics of the last applied cycle: ``proj_iters`` (0-d int64),
    ``min_cosine_sim``, ``min_cosine_after`` (0-d float32), ``winners`` (T,) int64."""

    norm_ema: Tensor
    prev: PyTree
    prev_sq_norms: Tensor
    history: Tensor
    proj_iters: Tensor
    min_cosine_sim: Tensor
    min_cosine_after: Tensor
    winners: Tensor


def resolution(config: ConductorConfig) -> GradientTransform:
    """The transform ``A (task-stacked, accumulation dtype) -> Σ_k resolved A_k`` (float32)."""
    k, dt, eps = config.num_tasks, config.accumulation_dtype, config.eps

    def init(params: PyTree) -> ResolutionState:
        device = tree.leaves(params)[0].device
        prev = tree.tree_map(lambda p: torch.zeros((k, *p.shape), dtype=dt, device=device), params)
        t = 2 * k if config.max_iters is None else config.max_iters
        f32 = torch.float32
        return ResolutionState(
            norm_ema=torch.ones(k, dtype=f32, device=device),
            prev=prev,
            prev_sq_norms=torch.zeros(k, dtype=f32, device=device),
            history=init_history(config.dominance_window, device),
            proj_iters=torch.zeros((), dtype=torch.int64, device=device),
            min_cosine_sim=torch.ones((), dtype=f32, device=device),
            min_cosine_after=torch.ones((), dtype=f32, device=device),
            winners=torch.full((t,), -1, dtype=torch.int64, device=device),
        )

    def update(
        state: ResolutionState,
        grads: PyTree,
        params: PyTree = None,
        *,
        gram: Tensor | None = None,
        cross: Tensor | None = None,
        **extra: Any,
    ) -> tuple[ResolutionState, PyTree]:
        if config.resolves_vectors:
            return _update_vectors(config, state, grads)
        a = tree.tree_map(lambda g: g.float(), grads)
        if gram is None or cross is None:
            gram, cross = gramian_and_cross(a, state.prev)
        gram_raw = gram
        raw_norms = torch.sqrt(torch.clamp(torch.diagonal(gram_raw), min=0.0))
        # the EMAs only feed the arbitrator, which needs a pair: one loss leaves them at 1.0
        ema = (
            state.norm_ema
            if k == 1
            else ema_of_norms(state.norm_ema, raw_norms, config.norm_ema_beta, eps)
        )
        if k == 1 and not config.cap_single_loss:
            scale = torch.ones_like(raw_norms)
        else:
            scale = cap_factors(raw_norms, config.norm_cap, eps)
        res = resolve_gramian(
            gram_raw * scale[:, None] * scale[None, :],
            config.thresholds,
            rule=config.rule,
            max_iters=config.max_iters,
            remap_power=config.remap_power,
            eps=eps,
            norm_floor=config.norm_floor,
            norm_ema=ema,
            prev_cross=cross * scale[:, None],
            prev_sq_norms=state.prev_sq_norms,
            history=state.history,
            tie_breaking_weights=config.tie_breaking_weights,
            dominance=config.dominance,
            arbitrate_weak=config.arbitrate_weak,
        )
        total = tree.weighted_sum(a, res.weights * scale)  # G = Σ_k resolved A_k (float32)
        if config.stability_source == "raw":
            prev = tree.tree_map(lambda g: g.to(dt), grads)
            prev_sq = torch.diagonal(gram_raw)
        else:
            prev = tree.tree_map(
                lambda g: g.to(dt), tree.combine(res.coefficients * scale[None, :], a)
            )
            prev_sq = torch.diagonal(res.gramian)
        return _state(config, ema, prev, prev_sq, res), total

    return GradientTransform(init, update)


def _state(
    config: ConductorConfig, ema: Tensor, prev: PyTree, prev_sq: Tensor, res: ResolveResult
) -> ResolutionState:
    min_cos = res.min_cosine_before
    if config.min_cosine == "reference":  # 1.0 unless a pair is below the weak threshold
        weak = config.thresholds[2]
        min_cos = torch.where(min_cos < weak, min_cos, torch.ones_like(min_cos))
    return ResolutionState(
        norm_ema=ema,
        prev=prev,
        prev_sq_norms=prev_sq,
        history=res.history,
        proj_iters=res.iterations,
        min_cosine_sim=min_cos.float(),
        min_cosine_after=res.min_cosine_after.float(),
        winners=res.winners,
    )


def _update_vectors(
    config: ConductorConfig, state: ResolutionState, grads: PyTree
) -> tuple[ResolutionState, PyTree]:
    """The resolution as the reference's vector passes over a copy of the ``A_k`` (in their own
    dtype): norms and dots in float32 from the rounded vectors, the cap and each projection
    rounded back, ``G`` the float32 sum of the resolved rows in task order."""
    k, eps = config.num_tasks, config.eps
    dt = config.accumulation_dtype
    a = tree.tree_map(lambda g: g.to(dt, copy=True), grads)
    raw_sq = torch.diagonal(vector_dots(a))
    raw_norms = torch.sqrt(raw_sq)
    ema = (
        state.norm_ema
        if k == 1
        else ema_of_norms(state.norm_ema, raw_norms, config.norm_ema_beta, eps)
    )
    if k > 1 or config.cap_single_loss:
        scale = cap_factors(raw_norms, config.norm_cap, eps)
        for x in tree.leaves(a):  # in place, each row rounded as the reference's mul_
            x.mul_(scale.reshape((k,) + (1,) * (x.dim() - 1)))
    res = resolve_vectors(
        a,
        config.thresholds,
        rule=config.rule,
        max_iters=config.max_iters,
        remap_power=config.remap_power,
        eps=eps,
        norm_floor=config.norm_floor,
        norm_ema=ema,
        prev=state.prev,
        prev_sq_norms=state.prev_sq_norms,
        history=state.history,
        tie_breaking_weights=config.tie_breaking_weights,
        dominance=config.dominance,
        arbitrate_weak=config.arbitrate_weak,
    )

    def row_sum(x: Tensor) -> Tensor:
        out = x[0].float()
        for row in x[1:]:
            out = out + row
        return out

    total = tree.tree_map(row_sum, a)
    if config.stability_source == "raw":
        prev, prev_sq = tree.tree_map(lambda g: g.to(dt), grads), raw_sq
    else:
        prev, prev_sq = a, torch.diagonal(res.gramian)
    return _state(config, ema, prev, prev_sq, res), total
