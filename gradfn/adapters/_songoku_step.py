"""One ``SonGokuScheduler`` step: run SON-GOKU, write ``p.grad``, and (``step``) step the optimizer
or (``backward``) leave that to the caller.

In ``backward`` mode a refresh that evaluates ``refresh_batch_provider`` batches is deferred to
the start of the next call (or to ``state_dict`` / the schedule accessors): the reference
evaluates it at the parameters after the optimizer step, which only exist once the caller has
stepped. Every other refresh only reads the EMAs and runs at once.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gradfn.adapters._common import (
    copy_tree,
    loss_scale,
    norm_buffers,
    restore_buffers,
    write_grads,
)
from gradfn.adapters._reference_io import append_jsonl, dump_graph
from gradfn.adapters._tasks import check_batches, heads_of
from gradfn.algorithms._songoku import active_mask, task_grads
from gradfn.algorithms._songoku._streaming import usage_grads

if TYPE_CHECKING:
    from collections.abc import Mapping

    from gradfn.adapters._songoku import SonGokuScheduler

__all__ = ["flush", "run"]


def _mask(sched: SonGokuScheduler, names: list[str]) -> Tensor:
    mask = torch.zeros(len(sched.tasks), dtype=torch.bool, device=sched._named[0][1].device)
    mask[[sched._index[n] for n in names]] = True
    return mask


def _providers(sched: SonGokuScheduler) -> dict[str, Any]:
    return {t.name: t.refresh_batch_provider() for t in sched.tasks if t.refresh_batch_provider}


def flush(sched: SonGokuScheduler) -> None:
    """Run the refresh a ``backward`` call deferred, at the current parameters."""
    pending = sched._pending
    if pending is None:
        return
    algo, state = sched._algo, sched._state
    assert algo is not None and state is not None
    covered, scale = pending
    fresh = _providers(sched)  # a provider that raises leaves the refresh pending
    sched._pending = None
    sched._state = algo.refresh(state, sched._params, fresh, covered, loss_scale=scale)
    if sched.dump_graph_dir is not None:
        dump_graph(sched.dump_graph_dir, sched._state)


def run(
    sched: SonGokuScheduler, batches: Mapping[str, Any], step_optimizer: bool
) -> dict[str, Any]:
    """One step; returns ``{"losses", "active", "skipped", "step"}``."""
    check_batches(batches, sched.names)
    flush(sched)
    # a step whose refresh can raise (it calls the batch providers or writes the graph) is all
    # or nothing: what it would change is copied first (on those steps only, every R steps)
    providers = step_optimizer and any(t.refresh_batch_provider for t in sched.tasks)
    can_fail = providers or sched.dump_graph_dir is not None
    saved = _snapshot(sched) if can_fail and sched._refresh_due() else None
    try:
        return _run(sched, batches, step_optimizer)
    except BaseException:
        if saved is not None:
            _restore(sched, saved)
        raise


def _snapshot(sched: SonGokuScheduler) -> tuple[Any, ...]:
    """Copies of what a step changes: the schedule, the parameters, the optimizer's and the
    scaler's states, the normalisation layers' running statistics."""
    opt = sched.optimizer
    return (
        sched._algo,
        None if sched._state is None else copy_tree(sched._state),
        sched._usage,
        list(sched._shared_names),
        [list(h) for h in sched._heads],
        [p.detach().clone() for _, p in sched._named],
        None if opt is None else copy.deepcopy(opt.state_dict()),
        None if sched.scaler is None else copy.deepcopy(sched.scaler.state_dict()),
        norm_buffers(sched._module),
    )


def _restore(sched: SonGokuScheduler, saved: tuple[Any, ...]) -> None:
    algo, state, usage, shared, heads, params, opt_state, scaler_state, stats = saved
    restore_buffers(stats)
    sched._algo, sched._state, sched._usage = algo, state, usage
    sched._shared_names, sched._heads, sched._pending = shared, heads, None
    with torch.no_grad():
        for (_, p), value in zip(sched._named, params, strict=True):
            p.copy_(value)
            p.grad = None
    if opt_state is not None and sched.optimizer is not None:
        sched.optimizer.load_state_dict(opt_state)
    if scaler_state is not None and sched.scaler is not None:
        sched.scaler.load_state_dict(scaler_state)


def _run(
    sched: SonGokuScheduler, batches: Mapping[str, Any], step_optimizer: bool
) -> dict[str, Any]:
    scale = loss_scale(sched.scaler, sched._named[0][1].device)
    stats = norm_buffers(sched._module)  # a skipped step leaves the running statistics as well
    first = sched._setup(batches, scale) if sched._algo is None else None
    algo, state = sched._algo, sched._state
    assert algo is not None and state is not None
    group = torch.nonzero(active_mask(state)).flatten().tolist()
    active = sched._quarantine.live(group)  # a quarantined task is left out
    missing = [sched.names[i] for i in active if sched.names[i] not in batches]
    if missing:
        raise ValueError(f"batches_by_task: missing batch for active task(s) {missing}")
    used = {sched.names[i]: batches[sched.names[i]] for i in active}
    providers = [t for t in sched.tasks if t.refresh_batch_provider is not None]
    covered = _mask(sched, [t.name for t in providers]) if providers else None
    due = algo.refresh_due(state)
    probe = None
    if due and sched.ema_mode == "refresh":
        extra = [
            t.name
            for t in sched.tasks
            if t.name in batches and t not in providers and t.name not in sched.quarantined
        ]
        used.update({n: batches[n] for n in extra})
        probe = _mask(sched, extra)
    if first is None:
        first = _learn(sched, active, used, probe, scale)
    refreshes = int(state.refreshes)

    def apply(st: Any, grads: dict[str, Tensor]) -> None:
        _apply(sched, st, grads, active, scale, step_optimizer)

    if due and providers and not step_optimizer:  # the refresh waits for the caller's step
        state, _ = algo.step(state, sched._params, used, probe, loss_scale=scale, grads=first)
        apply(state, _)
        if not bool(state.skipped):
            sched._pending = (covered, scale)
    else:
        state, _ = algo.update(
            state,
            sched._params,
            used,
            (lambda: _providers(sched)) if providers else None,
            refresh_tasks=covered,
            probe=probe,
            apply=apply,
            loss_scale=scale,
            grads=first,
        )
    sched._state = state
    if bool(state.skipped):
        restore_buffers(stats)
    if int(state.refreshes) != refreshes and sched.dump_graph_dir is not None:
        dump_graph(sched.dump_graph_dir, state)
    losses = state.losses.tolist()
    sched._quarantine.observe(active, losses, bool(state.skipped))
    out = {sched.names[i]: losses[i] for i in active}
    if sched.log_path is not None and sched.log_interval and sched.t % sched.log_interval == 0:
        record = {"t": sched.t, "losses": out, "classes": sched.schedule_snapshot()}
        append_jsonl(sched.log_path, {**record, "tau": sched.current_tau()})
    names = [sched.names[i] for i in active]
    return {"losses": out, "active": names, "skipped": bool(state.skipped), "step": sched.t}


def _learn(
    sched: SonGokuScheduler,
    active: list[int],
    used: Mapping[str, Any],
    probe: Tensor | None,
    scale: Tensor | None,
) -> Any:
    """This step's per-task gradients with which parameters each reaches, when an active task's
    reach is not known yet (its loss was constant at every earlier step: e.g. no labels); its
    usage row and the heads are updated. None (nothing to learn) otherwise: no extra cost."""
    assert sched._usage is not None
    blind = [i for i in active if not bool(sched._usage[i].any())]
    if not blind:
        return None
    mask = _mask(sched, [sched.names[i] for i in active])
    if probe is not None:
        mask = mask | probe
    config = sched._algo.config if sched._algo is not None else sched._config
    out = (usage_grads if sched.rows == "streaming" else task_grads)(
        config, sched._f, sched._params, used, mask, loss_scale=scale, return_usage=True
    )
    rows = torch.stack([out.usage[n].cpu() for n, _ in sched._named], dim=1)
    usage = sched._usage.clone()
    for r, i in enumerate(out.idx.tolist()):
        if i in blind:
            usage[i] = rows[r]
    sched._usage = usage
    sched._heads = heads_of(sched._named, usage, sched.tasks, sched._shared_names)
    return out


def _apply(
    sched: SonGokuScheduler,
    state: Any,
    grads: dict[str, Tensor],
    active: list[int],
    scale: Tensor | None,
    step_optimizer: bool,
) -> None:
    """Write ``p.grad`` for the parameters the active tasks reach (``None`` elsewhere; ``None``
    everywhere on a skipped step without a scaler, ``+inf`` with one) and maybe step."""
    skipped = bool(state.skipped)
    assert sched._usage is not None
    heads = {n for i in active for n in sched._heads[i]}
    # another task's head that an active task's graph reaches (e.g. every head computed in one
    # forward): a zero gradient, and a stateful optimizer would still move it, so none
    idle = {n for i, h in enumerate(sched._heads) if i not in active for n in h}
    idle -= heads | set(sched._shared_names)
    touched = sched._usage[active].any(dim=0).tolist()
    write = [
        (hit and name not in idle) or name in heads
        for (name, _), hit in zip(sched._named, touched, strict=True)
    ]
    if skipped and sched.scaler is None:  # nothing to apply: an optimizer step leaves θ as it is
        write = [False] * len(write)
    optimizer = sched.optimizer if step_optimizer else None
    if optimizer is not None:
        if skipped and sched.scaler is None:
            return
        optimizer.zero_grad(set_to_none=True)
    write_grads(sched._named, grads, write, scale=scale, poison=skipped)
    if optimizer is None:
        return
    if sched.scaler is None:
        optimizer.step()
    else:  # p.grad = g · scale: scaler.step unscales once; +inf on a skip backs the scale off
        sched.scaler.step(optimizer)
        sched.scaler.update()
