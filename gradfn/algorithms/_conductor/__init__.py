"""GradientConductor (GCond, arXiv:2509.07252): per-loss gradients accumulated over micro-batches,
their conflicts resolved, then GCond's own momentum or Lion branch; one gradient for any optimizer.

A cycle has two parts: :func:`~gradfn.algorithms.Conductor.accumulate` (eager, over ``N``
micro-batches) and :func:`~gradfn.algorithms.Conductor.process` (pure; compiles with
``torch.compile(fullgraph=True)``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from gradfn import tree
from gradfn._internal.checks import check_callable
from gradfn._internal.compat import require_compile
from gradfn.algorithms._base import Algorithm
from gradfn.algorithms._conductor._accumulate import Cycle, accumulate, new_buffers
from gradfn.algorithms._conductor._config import ConductorConfig, reference_options
from gradfn.algorithms._conductor._process import (
    ConductorState,
    ConductorStats,
    init_state,
    make_process,
)
from gradfn.algorithms._conductor._resolution import ResolutionState
from gradfn.integrations.amp import scale_losses, unscale
from gradfn.transforms import ApplyIfFiniteState
from gradfn.typing import LossFn, PyTree, Reducer

__all__ = [
    "Conductor",
    "ConductorConfig",
    "ConductorState",
    "ConductorStats",
    "Cycle",
    "ResolutionState",
    "conductor",
    "reference_options",
]

OutputSync = Callable[[PyTree, Tensor], tuple[PyTree, Tensor]]


@dataclass(frozen=True)
class Conductor(Algorithm):
    """GradientConductor as an algorithm; unpacks as ``init, update = conductor(...)``.

    * ``init(params) -> ConductorState``
    * ``update(state, params, microbatches, *, loss_scale=None) -> (state, grads)``: one cycle
      over ``N`` micro-batches (a sequence of ``N`` batches, or a callable returning the next).
    * ``accumulate(params, microbatches, *, loss_scale=None) -> Cycle``: the eager half.
    * ``process(state, grads, losses, raw_losses, params) -> (state, grads)``: the pure half.
    """

    accumulate: Callable[..., Cycle]
    process: Callable[..., tuple[ConductorState, PyTree]]
    config: ConductorConfig


def _accumulate(
    config: ConductorConfig,
    loss_fn: LossFn,
    params: PyTree,
    microbatches: Any,
    *,
    loss_scale: Tensor | None = None,
    reduce: Reducer | None = None,
    out: PyTree | None = None,
) -> Cycle:
    """The accumulated ``A_k`` and losses, unscaled and (with ``reduce``) averaged over ranks;
    ``out``: task-stacked buffers to fill (else fresh ones)."""
    cycle = accumulate(config, scale_losses(loss_fn, loss_scale), params, microbatches, out=out)
    grads, losses, raw = unscale((cycle.grads, cycle.losses, cycle.raw_losses), loss_scale)
    if reduce is not None:
        grads, losses, raw = reduce((grads, losses, raw))
    return Cycle(grads, losses, raw, cycle.reached)


def _revert(old: ConductorState, new: ConductorState) -> ConductorState:
    """``new`` as a skipped cycle: ``old``'s algorithm state, ``new``'s statistics."""
    inner = ApplyIfFiniteState(
        old.inner.inner,
        torch.ones_like(new.inner.skipped),
        old.inner.num_skipped + 1,
    )
    stats = new.stats._replace(final_grad_norm=torch.zeros_like(new.stats.final_grad_norm))
    return ConductorState(inner, stats, new.touched)


class _Buffers:
    """Two sets of task-stacked accumulators reused across cycles (donated, eager states): a
    cycle fills the set that the state's previous gradients do not live in, so no cycle
    allocates (and first-touches) ``K·n`` fresh floats."""

    def __init__(self, config: ConductorConfig) -> None:
        self.config = config
        self.sets: list[list[Tensor]] = []
        self.trees: list[PyTree] = []

    def free_set(self, params: PyTree, prev: PyTree) -> PyTree:
        """The set to fill: not sharing memory with ``prev`` (made on first use, remade when
        the parameters' shapes change)."""
        leaves = tree.leaves(params)
        if (
            not self.sets
            or any(
                b.shape[1:] != p.shape or b.device != p.device
                for b, p in zip(self.sets[0], leaves, strict=False)
            )
            or len(self.sets[0]) != len(leaves)
        ):
            self.trees = [new_buffers(self.config, params) for _ in range(2)]
            self.sets = [tree.leaves(t) for t in self.trees]
        busy = {x.untyped_storage().data_ptr() for x in tree.leaves(prev)}
        for bufs, t in zip(self.sets, self.trees, strict=True):
            if not any(b.untyped_storage().data_ptr() in busy for b in bufs):
                return t
        return new_buffers(self.config, params)  # both in use (not by this conductor's cycles)


def _update(
    accumulate_fn: Callable[..., Cycle],
    process_fn: Callable[..., tuple[ConductorState, PyTree]],
    sync_outputs: OutputSync | None,
    buffers: _Buffers | None,
    state: ConductorState,
    params: PyTree,
    microbatches: Any,
    *,
    loss_scale: Tensor | None = None,
) -> tuple[ConductorState, PyTree]:
    out = None if buffers is None else buffers.free_set(params, state.prev)
    cycle = accumulate_fn(params, microbatches, loss_scale=loss_scale, out=out)
    new, out = process_fn(state, cycle.grads, cycle.losses, cycle.raw_losses, params)
    new = new._replace(touched=state.touched | cycle.reached)
    if sync_outputs is None:
        return new, out
    out, skipped = sync_outputs(out, new.skipped)
    if bool(skipped):
        if not bool(new.skipped):  # another rank's cycle was skipped: so is this one
            new = _revert(state, new)
        return new, tree.tree_map(torch.zeros_like, out)
    sq = torch.stack([torch.linalg.vector_norm(g.float()) ** 2 for g in tree.leaves(out)])
    stats = new.stats._replace(final_grad_norm=torch.sqrt(sq.sum()))
    return new._replace(stats=stats), out


def conductor(
    loss_fn: LossFn,
    lambdas: Sequence[float] | Tensor | None = None,
    config: ConductorConfig | None = None,
    *,
    reduce: Reducer | None = None,
    sync_outputs: OutputSync | None = None,
    compile: bool | str = False,
    donate_state: bool = False,
    **options: Any,
) -> Conductor:
    """Build GradientConductor for ``loss_fn(params, batch) -> K losses``.

    Args:
        loss_fn: the ``K`` task losses of one micro-batch (dict / tuple / list / 1-D tensor).
        lambdas: ``K`` loss weights; with ``options`` the other :class:`ConductorConfig` fields
            (``accumulation_steps=N`` is required). Or give a ready ``config``.
        reduce: ``reduce(tree) -> tree`` averaging a pytree across ranks
            (:func:`gradfn.integrations.distributed.make_reducer`), applied to the accumulated
            ``A_k`` and losses before the resolution, so every rank takes the same decisions.
        sync_outputs: the reference's per-rank scheme instead: ``sync_outputs(grads, skipped) ->
            (grads, skipped)`` combines the resolved outputs across ranks after the cycle
            (:func:`gradfn.integrations.distributed.sync_outputs`); a cycle skipped on any rank is
            skipped on all.
        compile: compile ``process`` with ``torch.compile(fullgraph=True)``: ``True`` for
            inductor, or a backend name (``"aot_eager"``). With ``donate_state`` the resolution
            and momentum are compiled and the skip decision stays eager (no state copies).
            Needs torch ≥ 2.10 and optree ≥ 0.13.
        donate_state: the caller never reuses a state it passed in: a skipped cycle is decided
            with one host read instead of ``torch.where`` copies of the previous gradients and
            the momentum (eager; compiled code keeps the copies), and (without ``compile``) the
            accumulators are two sets of buffers reused across cycles, one of them holding the
            state's previous gradients (both stay allocated: ``2·K·n`` floats between cycles):
            a state passed in may be overwritten two cycles later.

    Raises:
        ValueError: at construction, for a bad value (naming the argument), including
            ``N % K != 0`` in stochastic mode.
        TypeError: at construction, for an argument of the wrong type or an unknown option.
        RuntimeError: at construction, ``compile`` with torch < 2.10 or optree < 0.13.
    """
    check_callable("loss_fn", loss_fn)
    check_callable("reduce", reduce, optional=True)
    check_callable("sync_outputs", sync_outputs, optional=True)
    if not isinstance(compile, (bool, str)):
        raise TypeError(f"`compile` must be a bool or a backend name, got {compile!r}")
    if compile:
        require_compile(f"compile={compile!r}", hint="leave compile=False")
    if "skip_guard" in options:
        warnings.warn(
            "conductor(skip_guard=...) is deprecated: use donate_state=True, which decides a "
            "skipped cycle on the host without copies",
            DeprecationWarning,
            stacklevel=2,
        )
        donate_state = donate_state or not options.pop("skip_guard")
    if config is None:
        if lambdas is None:
            raise TypeError("conductor: give `lambdas` (and accumulation_steps=...) or a `config`")
        try:
            config = ConductorConfig(lambdas=lambdas, **options)  # type: ignore[arg-type]
        except TypeError as err:
            if "unexpected keyword" not in str(err) and "missing" not in str(err):
                raise
            raise TypeError(f"conductor: {err}") from None
    elif lambdas is not None or options:
        raise TypeError("conductor: give a `config` or lambdas and options, not both")
    elif not isinstance(config, ConductorConfig):
        raise TypeError(f"`config` must be a ConductorConfig, got {type(config).__name__}")
    backend = None if not compile else (compile if isinstance(compile, str) else "inductor")
    process_fn = make_process(config, select="host" if donate_state else "where", backend=backend)
    accumulate_fn = partial(_accumulate, config, loss_fn, reduce=reduce)
    buffers = _Buffers(config) if donate_state and backend is None else None
    return Conductor(
        init=partial(init_state, config),
        update=partial(_update, accumulate_fn, process_fn, sync_outputs, buffers),
        accumulate=accumulate_fn,
        process=process_fn,
        config=config,
    )
