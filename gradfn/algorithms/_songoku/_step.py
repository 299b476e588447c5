"""One SON-GOKU step without recolouring (arXiv:2509.16959, Eq. 6): the active group's gradients,
combined by the in-group aggregator, and the EMA update of the tasks that were differentiated.

Tensor-only in its functional form (compiles with ``torch.compile(fullgraph=True)``); with
``donate`` (eager) the EMA rows are updated in place and the skip is decided on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradfn._internal.compat import is_compiling
from gradfn.algorithms._songoku._config import SonGokuConfig
from gradfn.algorithms._songoku._ema import blend_rows, finite_rows, observe
from gradfn.algorithms._songoku._state import SonGokuState, shared_names
from gradfn.autodiff import value_and_per_task_grads, value_and_weighted_grad
from gradfn.autodiff._engine import choose_strategy
from gradfn.integrations.amp import scale_losses, unscale
from gradfn.tree import gramian, tree_any_nonfinite, tree_scale, tree_where, weighted_sum
from gradfn.typing import LossFn, Params, PyTree, Reducer, State

__all__ = ["TaskGrads", "active_mask", "step", "task_grads"]

Psum = Callable[[Tensor], Tensor]  # sums a tensor over the ranks (the same result on each)


class TaskGrads(NamedTuple):
    """Per-task gradients of some tasks: ``losses`` (K,) of every task, ``rows`` task-stacked
    over ``idx`` (R,) int64, and ``usage`` (which parameters each row's task reaches, or None)."""

    losses: Tensor
    rows: dict[str, Tensor]
    idx: Tensor
    usage: PyTree = None


def active_mask(state: SonGokuState) -> Tensor:
    """``(K,)`` bool: the tasks of the group that runs at the next step."""
    return state.groups.index_select(0, state.group_index.reshape(1)).squeeze(0)


def task_grads(
    config: SonGokuConfig,
    loss_fn: LossFn,
    params: Params,
    batch: Any,
    tasks: Tensor,
    *,
    wrt: Callable[[str], bool] | None = None,
    loss_scale: Tensor | None = None,
    return_usage: bool = False,
    workspace: dict[Any, Any] | None = None,
) -> TaskGrads:
    """Unscaled per-task gradients of the tasks in the ``(K,)`` mask ``tasks``.

    Eagerly (``per_task_rows`` ``"active"`` / ``"auto"``) only those tasks are differentiated,
    read on the host; otherwise all ``K`` (``idx = arange(K)``). ``workspace``: a dict in which
    ``(K, *shape)`` row buffers are kept and reused from call to call (eager loop strategy).
    """
    k = config.num_tasks
    fn = scale_losses(loss_fn, loss_scale)
    compact = config.per_task_rows == "active" or (
        config.per_task_rows == "auto" and not is_compiling()
    )
    idx = torch.nonzero(tasks).flatten() if compact else torch.arange(k, device=tasks.device)
    buffers = _row_buffers(config, params, wrt, workspace) if compact else None
    out = value_and_per_task_grads(
        fn,
        params,
        batch,
        wrt=wrt,
        strategy=config.strategy,
        num_tasks=k,
        tasks=idx.tolist() if compact else None,
        return_usage=return_usage,
        workspace=buffers,
    )
    losses, rows = unscale((out[0], out[1]), loss_scale)
    return TaskGrads(losses, rows, idx, out[2] if return_usage else None)


def _row_buffers(
    config: SonGokuConfig,
    params: Params,
    wrt: Callable[[str], bool] | None,
    workspace: dict[Any, Any] | None,
) -> dict[str, Tensor] | None:
    """The ``(K, *shape)`` buffers the loop strategy writes the rows into, kept in
    ``workspace`` (None: none kept, or a strategy that does not use them)."""
    if workspace is None or is_compiling() or not isinstance(params, dict):
        return None
    selected = params if wrt is None else {n: p for n, p in params.items() if wrt(n)}
    strategy = config.strategy if config.strategy != "auto" else choose_strategy(selected)
    if strategy != "loop":
        return None
    key = tuple(sorted(selected))
    buffers = workspace.get(key)
    if buffers is None:
        buffers = workspace[key] = {
            n: torch.empty((config.num_tasks, *p.shape), dtype=p.dtype, device=p.device)
            for n, p in selected.items()
        }
    return buffers


def _sum_rows(rows: dict[str, Tensor], active_r: Tensor) -> tuple[dict[str, Tensor], bool]:
    """Eager Eq. 6 when every differentiated row is active: ``Σ_r g_r`` per leaf (a view of the
    row when there is one), else ``({}, False)`` (reads the ``(R,)`` row mask on the host)."""
    if not bool(active_r.all()):
        return {}, False
    if active_r.numel() == 1:
        return {n: g[0] for n, g in rows.items()}, True
    return {n: g.sum(dim=0) for n, g in rows.items()}, True


def _scatter_rows(tree: dict[str, Tensor], idx: Tensor, k: int) -> dict[str, Tensor]:
    def one(x: Tensor) -> Tensor:
        return torch.zeros((k, *x.shape[1:]), dtype=x.dtype, device=x.device).index_copy(0, idx, x)

    return {n: one(x) for n, x in tree.items()}


def _aggregate(
    config: SonGokuConfig,
    agg_state: State,
    shared_r: dict[str, Tensor],
    idx: Tensor,
    active: Tensor,
    red: Tensor,
    psum: Psum | None = None,
) -> tuple[State, dict[str, Tensor], Tensor]:
    """``(aggregator state, shared gradient, head weights (K,))`` of the active group
    (``psum``: the rows are shards, their partial Gramian is summed over the ranks)."""
    k = config.num_tasks
    w_sum = active.to(torch.float32) * red
    agg = config.aggregator
    if agg is None:  # paper Eq. 6: the sum over the group
        return agg_state, weighted_sum(shared_r, w_sum.index_select(0, idx)), w_sum
    if agg.weighting is not None:  # K×K only: the Gramian of the rows, weights, one weighted sum
        gram_r = gramian(shared_r, dtype=None)
        if psum is not None:
            gram_r = psum(gram_r)
        gram = torch.zeros(k, k, dtype=gram_r.dtype, device=gram_r.device)
        gram = gram.index_put((idx[:, None], idx[None, :]), gram_r)
        agg_state, w = agg.weighting(agg_state, gram, active=active)
        w = w * red.to(w.dtype)
        shared_g = weighted_sum(shared_r, w.index_select(0, idx))
        return agg_state, shared_g, (w if config.weight_heads else w_sum)
    act_r = active.index_select(0, idx)
    masked = {
        n: g * act_r.reshape((-1,) + (1,) * (g.dim() - 1)).to(g.dtype) for n, g in shared_r.items()
    }
    agg_state, out = agg.update(agg_state, _scatter_rows(masked, idx, k), active=active)
    w_heads = out.weights * red.to(out.weights.dtype) if config.weight_heads else w_sum
    return agg_state, tree_scale(out.grad, red), w_heads


def step(
    config: SonGokuConfig,
    loss_fn: LossFn,
    state: SonGokuState,
    params: Params,
    batch: Any,
    probe: Tensor | None = None,
    *,
    loss_scale: Tensor | None = None,
    reduce: Reducer | None = None,
    donate: bool = False,
    grads: TaskGrads | None = None,
    workspace: dict[Any, Any] | None = None,
    psum: Psum | None = None,
) -> tuple[SonGokuState, dict[str, Tensor]]:
    """One step: ``(state, grads)``, ``grads`` with the structure of ``params``.

    ``probe`` (K,) bool: tasks whose EMA this step also updates (``ema_mode="refresh"`` probes
    them on the step that triggers a refresh). ``grads``: per-task gradients already computed
    for this step (unscaled, this rank's), e.g. to learn which parameters each task reaches.
    ``workspace`` (eager): row buffers reused from step to step; the returned gradients may then
    be views of them, valid until the next step. ``psum`` (with ``grads``, FSDP): sums a tensor
    over ranks that each hold a shard of every row (the in-group Gramian, the skip test).
    A non-finite loss of an active task or gradient skips the step: the state is unchanged apart
    from ``skipped`` and ``losses``, and the returned gradients are zeros.
    """
    k = config.num_tasks
    active = active_mask(state)
    count = active.to(torch.float32).sum()
    red = 1.0 / count if config.reduction == "mean" else torch.ones_like(count)
    names = shared_names(config, params)
    ema_mask = active if config.ema_mode == "active" else torch.zeros_like(active)
    if probe is not None:
        ema_mask = ema_mask | probe.to(device=active.device, dtype=torch.bool)
    agg_state, lw_state = state.aggregator, state.loss_weighting
    obs: PyTree = None
    covered = False  # does the step's gradient see every row (so that its test covers them)?
    idx = torch.arange(k, device=active.device)

    if config.one_backward and probe is None and grads is None:
        fn = scale_losses(loss_fn, loss_scale)
        weights = active.to(torch.float32) * red
        losses, out = unscale(
            value_and_weighted_grad(fn, params, batch, weights, num_tasks=k), loss_scale
        )
        if reduce is not None:
            losses, out = reduce((losses, out))
    else:
        tg = grads or task_grads(
            config,
            loss_fn,
            params,
            batch,
            active | ema_mask,
            loss_scale=loss_scale,
            workspace=workspace,
        )
        losses, rows, idx = tg.losses, tg.rows, tg.idx
        # with a sketch and no aggregator the outputs are linear in the rows: averaging the
        # sketches and the summed gradient across ranks is cheaper than averaging the rows
        # (not with a loss weighting: it must see the averaged losses, as every rank's does)
        late_reduce = (
            config.sketch_dim is not None
            and config.aggregator is None
            and config.loss_weighting is None
        )
        if reduce is not None and not late_reduce:
            losses, rows = reduce((losses, rows))
        name_set = set(names)
        shared_r = {n: rows[n] for n in names}
        other_r = {n: g for n, g in rows.items() if n not in name_set}
        obs = observe(config, shared_r)  # the EMAs see the tasks' own (unweighted) gradients
        if config.loss_weighting is not None:
            lw_state, rows = _weight_rows(config, state.loss_weighting, losses, rows, idx, active)
            shared_r = {n: rows[n] for n in names}
            other_r = {n: g for n, g in rows.items() if n not in name_set}
        if config.aggregator is None and not is_compiling() and config.reduction == "sum":
            out, covered = _sum_rows(rows, active.index_select(0, idx))
        if not covered:
            agg_state, shared_g, w_heads = _aggregate(
                config, agg_state, shared_r, idx, active, red, psum
            )
            other_g = weighted_sum(other_r, w_heads.index_select(0, idx)) if other_r else {}
            out = {n: (shared_g[n] if n in name_set else other_g[n]) for n in params}
        if reduce is not None and late_reduce:
            losses, obs, out = reduce((losses, obs, out))
            covered = False
    return _guarded(
        config,
        state,
        losses,
        out,
        obs,
        idx,
        active,
        ema_mask,
        (agg_state, lw_state),
        donate,
        covered,
        psum,
    )


def _weight_rows(
    config: SonGokuConfig,
    lw_state: State,
    losses: Tensor,
    rows: dict[str, Tensor],
    idx: Tensor,
    active: Tensor,
) -> tuple[State, dict[str, Tensor]]:
    """The loss weighting's step: ``w = update(state, L)`` over the ``K`` losses, restricted to
    the active group ``S`` and renormalised, ``w̃_k = |S| w_k / Σ_{j∈S} w_j`` (uniform weights
    give the plain group sum, Eq. 6); the rows scaled by ``w̃`` (the gradients of ``w̃_k L_k``)."""
    lw_state, w = group_weights(config, lw_state, losses, active)
    w_r = w.index_select(0, idx)
    return lw_state, {
        n: g * w_r.reshape((-1,) + (1,) * (g.dim() - 1)).to(g.dtype) for n, g in rows.items()
    }


def group_weights(
    config: SonGokuConfig, lw_state: State, losses: Tensor, active: Tensor
) -> tuple[State, Tensor]:
    """The loss weighting's ``(state, w̃ (K,) float32)``: ``w̃_k = |S| w_k / Σ_{j∈S} w_j`` on the
    active group ``S``, 0 elsewhere (see :func:`_weight_rows`)."""
    assert config.loss_weighting is not None
    lw_state, w = config.loss_weighting.update(lw_state, losses.detach())
    w = torch.where(active, w.to(torch.float32), 0.0)
    return lw_state, w * (active.to(torch.float32).sum() / w.sum())


def _guarded(
    config: SonGokuConfig,
    state: SonGokuState,
    losses: Tensor,
    grads: dict[str, Tensor],
    obs: PyTree,
    idx: Tensor,
    active: Tensor,
    ema_mask: Tensor,
    states: tuple[State, State],
    donate: bool,
    covered: bool = False,
    psum: Psum | None = None,
) -> tuple[SonGokuState, dict[str, Tensor]]:
    """The skip policy: a non-finite active loss, gradient or EMA observation leaves the state
    as it was (apart from ``skipped`` and ``losses``) and returns zero gradients.
    ``covered``: the gradients are the sum of every observed row, so their test covers the rows
    (a NaN or an infinity in any row reaches the sum). ``psum``: the skip is decided when any
    rank's shard is non-finite."""
    losses = losses.to(torch.float32)
    bad = (~torch.isfinite(losses) & active).any() | tree_any_nonfinite(grads)
    upd_r = ema_mask.index_select(0, idx)
    if obs is not None and not covered:
        bad = bad | (upd_r & ~finite_rows(obs)).any()
    if psum is not None:
        bad = psum(bad.to(torch.float32).reshape(1)).reshape(()) > 0
    beta = config.ema_beta
    moved = dict(
        step=state.step + 1,
        group_index=torch.remainder(state.group_index + 1, state.num_groups),
        active=active,
        aggregator=states[0],
        loss_weighting=states[1],
    )
    if donate and not is_compiling():  # one host read, no copies
        if bool(bad):
            zeros = {n: torch.zeros_like(g) for n, g in grads.items()}
            return state._replace(skipped=bad, losses=losses), zeros
        ema, count = state.ema, state.ema_count
        if obs is not None:
            ema = blend_rows(state.ema, obs, idx, upd_r, beta, donate=True)
            count = state.ema_count + ema_mask.to(torch.int64)
        new = state._replace(**moved, skipped=bad, losses=losses, ema=ema, ema_count=count)
        return new, grads
    ok = ~bad
    ema, count = state.ema, state.ema_count
    if obs is not None:
        ema = blend_rows(state.ema, obs, idx, upd_r & ok, beta, donate=False)
        count = state.ema_count + (ema_mask & ok).to(torch.int64)
    small = state._replace(ema=None)
    new = tree_where(ok, small._replace(**moved), small)
    new = new._replace(skipped=bad, losses=losses, ema=ema, ema_count=count)
    zero = torch.zeros((), dtype=losses.dtype, device=losses.device)
    return new, {n: torch.where(ok, g, zero.to(g.dtype)) for n, g in grads.items()}
