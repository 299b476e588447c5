"""SON-GOKU's driver: a step every call, a recolouring every ``R`` steps (the one place that
decides when to refresh and which tasks to probe)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradfn.algorithms._songoku._config import SonGokuConfig
from gradfn.algorithms._songoku._ema import blend_rows, observe
from gradfn.algorithms._songoku._recolor import recolor
from gradfn.algorithms._songoku._state import SonGokuState, shared_names
from gradfn.algorithms._songoku._step import TaskGrads, step, task_grads
from gradfn.algorithms._songoku._streaming import sketched, streaming_step
from gradfn.typing import LossFn, Params, Reducer

__all__ = ["refresh", "refresh_due", "update"]


def refresh_due(config: SonGokuConfig, state: SonGokuState) -> bool:
    """Does the next step end a refresh window (``(t + 1) mod R = 0``)? Reads the host."""
    return (int(state.step) + 1) % config.refresh_period == 0


def refresh(
    config: SonGokuConfig,
    loss_fn: LossFn,
    state: SonGokuState,
    params: Params,
    batch: Any = None,
    probe: Tensor | None = None,
    *,
    loss_scale: Tensor | None = None,
    reduce: Reducer | None = None,
    donate: bool = False,
    streaming: bool = False,
) -> SonGokuState:
    """Recolour: (optional EMA update on ``batch``), ``τ(t)``, ``ρ``, graph, colouring.

    ``batch`` holds fresh per-task data for ``loss_fn``; ``probe`` (K,) bool selects the tasks
    whose EMA it updates (default: all; none: the batch is not evaluated). Tasks with a non-finite
    loss or gradient keep their EMA. ``streaming``: the sketches come from one batched backward
    without the per-task rows (:func:`~gradfn.algorithms._songoku._streaming.sketched`).
    """
    if batch is not None and (probe is None or bool(probe.any())):
        k = config.num_tasks
        device = state.step.device
        mask = (
            torch.ones(k, dtype=torch.bool, device=device)
            if probe is None
            else probe.to(device=device, dtype=torch.bool)
        )
        if streaming:
            losses, obs, idx = sketched(config, loss_fn, params, batch, mask, loss_scale)
        else:
            wrt = None if config.shared is None else config.is_shared
            tg = task_grads(config, loss_fn, params, batch, mask, wrt=wrt, loss_scale=loss_scale)
            losses, idx = tg.losses, tg.idx
            obs = observe(config, {n: tg.rows[n] for n in shared_names(config, params)})
        if reduce is not None:
            losses, obs = reduce((losses, obs))
        finite = torch.isfinite(losses.to(torch.float32)).index_select(0, idx)
        for leaf in [obs] if isinstance(obs, Tensor) else list(obs.values()):
            finite = finite & torch.isfinite(leaf.flatten(1)).all(dim=1)
        upd = mask.index_select(0, idx) & finite
        state = state._replace(
            ema=blend_rows(state.ema, obs, idx, upd, config.ema_beta, donate=donate),
            ema_count=state.ema_count.index_add(0, idx, upd.to(torch.int64)),
        )
    return recolor(config, state)


def update(
    config: SonGokuConfig,
    loss_fn: LossFn,
    state: SonGokuState,
    params: Params,
    batch: Any,
    refresh_batch: Any = None,
    *,
    refresh_tasks: Tensor | None = None,
    probe: Tensor | None = None,
    apply: Callable[[SonGokuState, dict[str, Tensor]], None] | None = None,
    loss_scale: Tensor | None = None,
    reduce: Reducer | None = None,
    donate: bool = False,
    grads: TaskGrads | None = None,
    workspace: dict[Any, Any] | None = None,
    streaming: bool = False,
) -> tuple[SonGokuState, dict[str, Tensor]]:
    """``step``, then ``refresh`` when ``t`` reaches a multiple of ``R`` (eager driver).

    Args:
        refresh_batch: fresh per-task data for the refresh (or a zero-argument callable that
            returns it, called only when a refresh is due); None: the refresh reuses the EMAs.
        refresh_tasks: (K,) bool, the tasks ``refresh_batch`` covers (default: all of them).
        probe: (K,) bool, in ``ema_mode="refresh"`` the tasks whose EMA the step that triggers
            a refresh updates from its own batch (default: every task ``refresh_batch`` does
            not cover).
        apply: ``apply(state, grads)``, called after the step and before the refresh (e.g. an
            optimizer step: a refresh batch is then evaluated at the updated parameters, as the
            reference implementation does).
        grads: this step's per-task gradients, already computed (see ``step``).
        streaming: the sketched path without the per-task rows (:func:`streaming_step`).
    """
    due = refresh_due(config, state)
    k = config.num_tasks
    device = state.step.device
    covered = (
        refresh_tasks.to(device=device, dtype=torch.bool)
        if refresh_tasks is not None
        else torch.full((k,), refresh_batch is not None, dtype=torch.bool, device=device)
    )
    if due and config.ema_mode == "refresh" and probe is None and not bool(covered.all()):
        probe = ~covered
    state, out = (streaming_step if streaming else step)(
        config,
        loss_fn,
        state,
        params,
        batch,
        probe if due else None,
        loss_scale=loss_scale,
        reduce=reduce,
        donate=donate,
        grads=grads,
        workspace=workspace,
    )
    if apply is not None:
        apply(state, out)
    if due and not bool(state.skipped):
        fresh = refresh_batch() if callable(refresh_batch) else refresh_batch
        state = refresh(
            config,
            loss_fn,
            state,
            params,
            fresh,
            covered if fresh is not None else None,
            loss_scale=loss_scale,
            reduce=reduce,
            donate=donate,
            streaming=streaming,
        )
    return state, out
