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

The state holds the algorithm's memory (norm EMAs, previous gradients, winner ring) and the
diagnostics of the last resolution it applied.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradfn import tree
from gradfn.algorithms._conductor._config import ConductorConfig
from gradfn.conflict import gramian_and_cross, init_history, resolve_gramian
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
        min_cos = res.min_cosine_before
        if config.min_cosine == "reference":  # 1.0 unless a pair is below the weak threshold
            weak = config.thresholds[2]
            min_cos = torch.where(min_cos < weak, min_cos, torch.ones_like(min_cos))
        new = ResolutionState(
            norm_ema=ema,
            prev=prev,
            prev_sq_norms=prev_sq,
            history=res.history,
            proj_iters=res.iterations,
            min_cosine_sim=min_cos.float(),
            min_cosine_after=res.min_cosine_after.float(),
            winners=res.winners,
        )
        return new, total

    return GradientTransform(init, update)
