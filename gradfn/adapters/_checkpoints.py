"""The adapters' checkpoints and debug views: ``state_dict`` / ``load_state_dict`` (the current
format, and gradfn 0.1's, converted on load) and SON-GOKU's ``debug_state``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import optree
import torch

from gradfn import tree
from gradfn.adapters import _state_checks as checks
from gradfn.adapters._common import copy_tree, from_plain, plain_state
from gradfn.adapters._quarantine import Quarantine
from gradfn.aggregators import CounterState, InverseNormState
from gradfn.algorithms import ConductorState, SonGokuState
from gradfn.transforms import ApplyIfFiniteState, MomentumState

if TYPE_CHECKING:
    from gradfn.adapters._conductor import GradientConductor
    from gradfn.adapters._songoku import SonGokuScheduler

__all__ = [
    "conductor_load_state_dict",
    "conductor_state_dict",
    "songoku_debug_state",
    "songoku_load_state_dict",
    "songoku_state_dict",
]

VERSION = 2


# ---------------------------------------------------------------------------------------------
# SON-GOKU


def songoku_state_dict(sched: SonGokuScheduler) -> dict[str, Any]:
    """``{"version", "task_names", "config", "core": the state's fields | None, "usage",
    "shared_params", "head_params"}``: copies in plain containers
    (``torch.load(weights_only=True)`` reads them)."""
    return {
        "version": VERSION,
        "task_names": list(sched.names),
        "config": checks.songoku_fingerprint(sched._config),
        "core": None if sched._state is None else plain_state(sched._state),
        "usage": None if sched._usage is None else sched._usage.clone(),
        "shared_params": list(sched._shared_names),
        "head_params": [list(h) for h in sched._heads],
        "quarantined": sched.quarantined,
    }


def _songoku_from_v1(core: Mapping[str, Any], template: SonGokuState) -> SonGokuState:
    """A gradfn 0.1 state (``core``: its fields by name) in the current layout."""
    agg = template.aggregator
    if isinstance(agg, CounterState):  # PCGrad in the group: the 0.1 order counter was the step
        agg = CounterState(torch.as_tensor(core["seed"]), torch.as_tensor(core["step"]))
    elif isinstance(agg, InverseNormState):
        agg = InverseNormState(torch.as_tensor(core["norm_ema"]))
    names = [f for f in SonGokuState._fields if f not in ("aggregator", "loss_weighting")]
    fields = {f: core["ptr" if f == "group_index" else f] for f in names}
    state = SonGokuState(
        **copy_tree(fields),
        aggregator=copy_tree(agg),
        loss_weighting=copy_tree(template.loss_weighting),
    )
    converted: SonGokuState = tree.tree_map(
        lambda new, cur: torch.as_tensor(new).to(device=cur.device, dtype=cur.dtype),
        state,
        template,
    )
    return converted


def songoku_load_state_dict(sched: SonGokuScheduler, state_dict: Mapping[str, Any]) -> None:
    """Checked in full before anything changes (:mod:`._state_checks`): the task names, the
    configuration, the model's parameters, the shared set, the running values' finiteness."""
    version = state_dict.get("version") if isinstance(state_dict, Mapping) else None
    if version not in (1, VERSION):
        raise ValueError(
            "load_state_dict: not a SonGokuScheduler state_dict (version 1 from gradfn 0.1, or "
            f"version {VERSION})"
        )
    if list(state_dict.get("task_names", [])) != sched.names:
        raise ValueError(
            f"load_state_dict: task names {state_dict.get('task_names')} do not match {sched.names}"
        )
    checks.check_fingerprint(
        state_dict.get("config"), checks.songoku_fingerprint(sched._config), "SonGokuScheduler"
    )
    Quarantine(sched.names, None).load(state_dict.get("quarantined"))  # checked
    core = state_dict.get("core")
    if core is None:
        sched._algo, sched._state, sched._usage = None, None, None
        sched._quarantine.load(state_dict.get("quarantined"))
        return
    usage, shared, heads = checks.check_songoku_split(sched, state_dict)
    old = (sched._algo, sched._state, sched._usage, sched._shared_names, sched._heads)
    try:
        sched._build(usage, shared, heads)
        assert sched._algo is not None
        template = sched._algo.init(sched._params)
        if version == 1:
            state = _songoku_from_v1(core, template)
        else:
            if isinstance(core, Mapping) and "loss_weighting" not in core:
                core = {**core, "loss_weighting": {}}  # saved before loss weightings: empty
            state = from_plain(template, core, "SON-GOKU state")
        checks.check_finite(checks.songoku_running_values(state), "SON-GOKU state")
    except BaseException:
        sched._algo, sched._state, sched._usage, sched._shared_names, sched._heads = old
        raise
    sched._state = state
    sched._quarantine.load(state_dict.get("quarantined"))


def songoku_debug_state(sched: SonGokuScheduler) -> dict[str, Any]:
    """The reference's ``debug_state()`` keys, plus ``skipped``, ``shared_params``,
    ``head_params``; ``ema_norms`` (``{task: ‖e_k‖}``) is there from the start (0.0: the EMAs
    start at zero)."""
    groups = sched.schedule_snapshot()
    st = sched._state
    out: dict[str, Any] = {
        "t": sched.t,
        "tau": sched.current_tau(),
        "classes": groups,
        "schedule_len": len(groups),
        "step_in_cycle": 0 if st is None else int(st.group_index),
        "refresh_period": sched.refresh_period,
        "min_updates_per_cycle": sched.min_updates_per_cycle,
        "skipped": False if st is None else bool(st.skipped),
        "shared_params": list(sched._shared_names),
        "head_params": {sched.names[i]: list(h) for i, h in enumerate(sched._heads)},
    }
    if st is None:
        out["ema_norms"] = dict.fromkeys(sched.names, 0.0)
        return out
    k = len(sched.names)
    if int(st.refreshes) > 0:
        adj = st.adjacency.tolist()
        out["last_tau_value"] = float(st.tau)
        out["conflict_graph"] = {
            sched.names[i]: sorted(sched.names[j] for j in range(k) if adj[i][j]) for i in range(k)
        }
        out["interference_matrix"] = st.rho.tolist()
    sq = torch.zeros(k, dtype=torch.float64)
    for leaf in optree.tree_leaves(st.ema):
        sq = sq + leaf.reshape(k, -1).to(torch.float64).pow(2).sum(dim=1).cpu()
    norms = sq.sqrt().tolist()
    out["ema_norms"] = {sched.names[i]: norms[i] for i in range(k)}
    return out


# ---------------------------------------------------------------------------------------------
# GradientConductor


def conductor_state_dict(gc: GradientConductor) -> dict[str, Any]:
    """``{"version", "loss_names", "config", "state": the state's fields}`` (copies, plain
    containers)."""
    return {
        "version": VERSION,
        "loss_names": list(gc.loss_names),
        "config": checks.conductor_fingerprint(gc._algo.config),
        "state": plain_state(gc._state),
    }


def _conductor_from_v1(saved: Mapping[str, Any], template: ConductorState) -> ConductorState:
    """A gradfn 0.1 ``state`` dict (``momentum/0``, ``prev/<param>``, ``norm_ema``, …)."""

    def get(key: str, like: torch.Tensor) -> torch.Tensor:
        if key not in saved:
            raise ValueError(
                f"load_state_dict: entry {key!r} missing from the gradfn 0.1 checkpoint"
            )
        return torch.as_tensor(saved[key]).to(device=like.device, dtype=like.dtype).clone()

    res = template.resolution
    history = torch.as_tensor(saved.get("history", res.history))
    w = res.history.shape[0]
    if history.shape[0] != w:  # a different dominance_window: keep the newest entries
        pad = torch.full((w,), -1, dtype=torch.int64)
        history = torch.cat([pad, history.to(torch.int64).cpu()])[-w:] if w else res.history
    res = res._replace(
        norm_ema=get("norm_ema", res.norm_ema),
        prev={n: get(f"prev/{n}", p) for n, p in res.prev.items()},
        prev_sq_norms=get("prev_sq_norms", res.prev_sq_norms),
        history=history.to(device=res.history.device, dtype=res.history.dtype),
        proj_iters=get("proj_iters", res.proj_iters),
        min_cosine_sim=get("min_cosine_sim", res.min_cosine_sim),
        min_cosine_after=get("min_cosine_after", res.min_cosine_after),
        winners=get("winners", res.winners) if "winners" in saved else res.winners,
    )
    mom = template.momentum
    mom = MomentumState(
        get("momentum/0", mom.count), {n: get(f"momentum/1/{n}", m) for n, m in mom.mu.items()}
    )
    post = template.inner.inner[1]
    post = mom if isinstance(post, MomentumState) else (mom, *post[1:])
    inner = ApplyIfFiniteState(
        (res, post), get("skipped", template.skipped), get("num_skipped", template.num_skipped)
    )
    stats = template.stats._replace(
        **{f: get(f, getattr(template.stats, f)) for f in template.stats._fields}
    )
    return ConductorState(inner, stats, template.touched)


def conductor_load_state_dict(gc: GradientConductor, state_dict: Mapping[str, Any]) -> None:
    """Checked in full before the state is replaced: the loss names, the configuration, the
    shapes, the running values' finiteness."""
    if not isinstance(state_dict, Mapping) or "state" not in state_dict:
        raise ValueError("load_state_dict: expected a dict from GradientConductor.state_dict()")
    names = list(state_dict.get("loss_names", []))
    if names != gc.loss_names:
        raise ValueError(
            f"load_state_dict: the checkpoint has losses {names}, this conductor {gc.loss_names}"
        )
    checks.check_fingerprint(
        state_dict.get("config"), checks.conductor_fingerprint(gc._algo.config), "GradientConductor"
    )
    version = state_dict.get("version", 1)  # gradfn 0.1 wrote no version
    if version == 1:
        state = _conductor_from_v1(state_dict["state"], gc._state)
    elif version == VERSION:
        state = from_plain(gc._state, state_dict["state"], "GradientConductor state")
    else:
        raise ValueError(f"load_state_dict: unknown GradientConductor state_dict version {version}")
    checks.check_finite(checks.conductor_running_values(state), "GradientConductor state")
    gc._state = state
