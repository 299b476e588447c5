"""The second half of a GCond cycle: a composition of transforms around the fused K-space
resolution, wrapped by one skip policy.

``process = apply_if_finite(resolution ▷ (momentum | lion))``: the resolution aggregator
(:mod:`._resolution`: norm EMA, cap, conflict resolution in coefficient space, one weighted sum),
then bias-corrected momentum (or GCond's Lion branch, momentum then sign × trust ratio). The
non-finite test is one ``K×K`` check of the Gramian (a NaN or an infinity anywhere in the ``A_k``
shows on its diagonal) and of the losses. Pure and tensor-only: it compiles with
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from gradfn import tree
from gradfn.algorithms._conductor._config import ConductorConfig
from gradfn.algorithms._conductor._resolution import ResolutionState, resolution
from gradfn.conflict import gramian_and_cross
from gradfn.transforms import (
    ApplyIfFiniteState,
    GradientTransform,
    MomentumState,
    apply_if_finite,
    lion,
    momentum,
    skip_if_nonfinite,
)
from gradfn.typing import PyTree, State

__all__ = ["ConductorState", "ConductorStats", "init_state", "make_process", "pipeline"]

Psum = Callable[[Tensor], Tensor]  # sums a tensor over the ranks (the same result on each)


class ConductorStats(NamedTuple):
    """What the last cycle measured (recorded whether it was applied or skipped): ``losses``
    (K,) λ-weighted mean losses, ``raw_losses`` (K,) unweighted, ``raw_norms`` (K,) ``‖A_k‖``
    before the cap, ``final_grad_norm`` (0-d) of the returned gradient (0 when skipped)."""

    losses: Tensor
    raw_losses: Tensor
    raw_norms: Tensor
    final_grad_norm: Tensor


class ConductorState(NamedTuple):
    """State of GradientConductor.

    * ``inner``: :class:`~gradfn.transforms.ApplyIfFiniteState` around ``(resolution state,
      momentum state)``: what a skipped cycle leaves unchanged, plus ``skipped`` / ``num_skipped``.
    * ``stats``: :class:`ConductorStats` of the last cycle.
    * ``touched``: (P,) bool over the parameters' leaves: reached by some loss so far.

    The fields of GradientConductor 0.1 are properties (``state.momentum``, ``state.norm_ema``,
    ``state.losses``, ``state.skipped``, ``state.step``, ...).
    """

    inner: ApplyIfFiniteState
    stats: ConductorStats
    touched: Tensor

    # --- views by name -------------------------------------------------------------------
    @property
    def resolution(self) -> ResolutionState:
        return self.inner.inner[0]

    @property
    def momentum(self) -> MomentumState:
        """The (bias-corrected) momentum's state (``count`` = the reference's ``step``)."""
        post = self.inner.inner[1]
        return post[0] if isinstance(post, tuple) and not isinstance(post, MomentumState) else post

    @property
    def step(self) -> Tensor:
        """Number of momentum updates (the reference's ``step`` stat)."""
        return self.momentum.count

    @property
    def skipped(self) -> Tensor:
        return self.inner.skipped

    @property
    def num_skipped(self) -> Tensor:
        return self.inner.num_skipped

    @property
    def prev(self) -> PyTree:
        return self.resolution.prev

    @property
    def prev_sq_norms(self) -> Tensor:
        return self.resolution.prev_sq_norms

    @property
    def norm_ema(self) -> Tensor:
        return self.resolution.norm_ema

    @property
    def history(self) -> Tensor:
        return self.resolution.history

    @property
    def proj_iters(self) -> Tensor:
        return self.resolution.proj_iters

    @property
    def min_cosine_sim(self) -> Tensor:
        return self.resolution.min_cosine_sim

    @property
    def min_cosine_after(self) -> Tensor:
        return self.resolution.min_cosine_after

    @property
    def winners(self) -> Tensor:
        return self.resolution.winners

    @property
    def losses(self) -> Tensor:
        return self.stats.losses

    @property
    def raw_losses(self) -> Tensor:
        return self.stats.raw_losses

    @property
    def raw_norms(self) -> Tensor:
        return self.stats.raw_norms

    @property
    def final_grad_norm(self) -> Tensor:
        return self.stats.final_grad_norm


def _post(config: ConductorConfig, psum: Psum | None = None) -> GradientTransform:
    if config.use_lion:
        return lion(
            config.momentum_beta,
            config.trust_ratio_coef,
            config.trust_ratio_clip,
            eps=config.eps,
            dtype=config.accumulation_dtype,
            psum=psum,
        )
    return momentum(config.momentum_beta, dtype=config.accumulation_dtype)


def pipeline(config: ConductorConfig, psum: Psum | None = None) -> GradientTransform:
    """``resolution ▷ post`` over task-stacked ``A`` (unguarded: :func:`make_process` wraps it
    in the skip policy); ``return_raw_grad`` returns the resolved sum while the momentum still
    advances. ``psum``: see :func:`make_process`."""
    res, post = resolution(config), _post(config, psum)

    def init(params: PyTree) -> tuple[State, State]:
        return res.init(params), post.init(params)

    def update(
        state: tuple[State, State], grads: PyTree, params: PyTree = None, **extra: Any
    ) -> tuple[tuple[State, State], PyTree]:
        res_state, total = res.update(state[0], grads, params, **extra)
        post_state, out = post.update(state[1], total, params)
        return (res_state, post_state), (total if config.return_raw_grad else out)

    return GradientTransform(init, update)


def init_state(config: ConductorConfig, params: PyTree) -> ConductorState:
    """Zero momentum and previous gradients, norm EMAs at 1.0, an empty winner history."""
    k = config.num_tasks
    device = tree.leaves(params)[0].device
    return ConductorState(
        inner=apply_if_finite(pipeline(config)).init(params),
        stats=ConductorStats(
            losses=torch.zeros(k, dtype=torch.float32, device=device),
            raw_losses=torch.zeros(k, dtype=torch.float32, device=device),
            raw_norms=torch.zeros(k, dtype=torch.float32, device=device),
            final_grad_norm=torch.zeros((), dtype=torch.float32, device=device),
        ),
        touched=torch.zeros(len(tree.leaves(params)), dtype=torch.bool),  # host-side facts
    )


def make_process(
    config: ConductorConfig,
    *,
    select: Literal["where", "host"] = "where",
    backend: str | None = None,
    psum: Psum | None = None,
) -> Callable[..., tuple[ConductorState, PyTree]]:
    """``process(state, grads, losses, raw_losses, params) -> (state, grads)`` for one cycle:
    ``apply_if_finite(resolution ▷ post)`` with the skip decided on the ``K×K`` Gramian.

    ``grads``: the accumulated task-stacked ``A_k``; ``losses`` / ``raw_losses``: statistics (K,).
    Returns the new state and the gradient to hand to the optimizer (float32, or the accumulation
    dtype's momentum output; ``return_raw_grad``: the float32 resolved sum). ``select="host"``:
    a skipped cycle is decided with one host read instead of ``torch.where`` copies (eager).
    ``backend``: compile it with ``torch.compile(fullgraph=True)``; with ``select="host"`` all
    but the skip decision is compiled, which stays eager. ``psum``: sums a tensor over ranks
    that each hold a shard of every ``A_k`` (FSDP): the partial Gramian and cross-Gramian
    (``2K²`` floats, one call), the output's squared norm and Lion's per-tensor squared norms are
    summed, so every decision is the full gradients' and the same on every rank.
    """
    inner = pipeline(config, psum)

    def unguarded(
        state: tuple[State, State],
        grads: PyTree,
        losses: Tensor,
        raw_losses: Tensor,
        params: PyTree,
    ) -> tuple[tuple[State, State], PyTree, Tensor, ConductorStats]:
        # the Gramian and the cross-Gramian with the previous A_k in one pass over the A_k
        gram, cross = gramian_and_cross(grads, state[0].prev)
        if psum is not None:
            gram, cross = psum(torch.stack((gram, cross.to(gram.dtype)))).unbind(0)
        # a NaN / Inf anywhere in the A_k shows on the Gramian's diagonal: one K×K test
        bad = ~torch.isfinite(gram).all() | ~torch.isfinite(losses).all()
        new, out = inner.update(state, grads, params, gram=gram, cross=cross)
        norms = torch.stack(torch._foreach_norm([x.float() for x in tree.leaves(out)]))
        if psum is None:
            out_norm = torch.linalg.vector_norm(norms)
        else:
            out_norm = torch.sqrt(psum((norms**2).sum()))
        stats = ConductorStats(
            losses=losses.float(),
            raw_losses=raw_losses.float(),
            raw_norms=torch.sqrt(torch.clamp(torch.diagonal(gram), min=0.0)),
            final_grad_norm=torch.where(bad, 0.0, out_norm),
        )
        return new, out, bad, stats

    core = unguarded
    if backend is not None and select == "host":
        core = torch.compile(unguarded, fullgraph=True, backend=backend)

    def process(
        state: ConductorState, grads: PyTree, losses: Tensor, raw_losses: Tensor, params: PyTree
    ) -> tuple[ConductorState, PyTree]:
        new, out, bad, stats = core(state.inner.inner, grads, losses, raw_losses, params)
        guarded, out = skip_if_nonfinite(bad, state.inner, new, out, select=select)
        return ConductorState(guarded, stats, state.touched), out

    if backend is not None and select == "where":
        return torch.compile(process, fullgraph=True, backend=backend)
    return process
