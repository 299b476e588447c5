"""SON-GOKU's sketched step without the ``K × n`` per-task rows (``rows="streaming"``).

With a CountSketch EMA (``sketch_dim``) a step needs of the per-task gradients only their
sketches ``s_k = P g_k`` (``K × d_sk``) and the active group's (weighted) sum (Eq. 6 of
arXiv:2509.16959). ``P`` is linear and acts leaf by leaf, so every shared leaf's ``K`` rows are
sketched while autograd holds them, in one batched backward
(:func:`gradfn.conflict.streamed_sketch`), and the parameter update is one more backward of
``Σ_{k∈S_t} c_k L_k`` on the retained graph, ``c_k`` the row path's weights (``1``, ``1/|S_t|``
with ``reduction="mean"``, times a loss weighting's ``w̃_k``). The sketches, the EMA, the skip
policy and the recolouring are those of the row path: the same groups, the same update (up to
the rounding of a different summation order). Peak memory: one parameter copy plus the rows of
the leaves in flight plus ``K`` activation cotangents, never ``K × n``.

Eager only (the active group is read on the host); no in-group aggregator (it needs the rows).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradfn.aggregators._streaming import check_memory_budget, over_budget
from gradfn.algorithms._songoku._config import SonGokuConfig
from gradfn.algorithms._songoku._state import SonGokuState, shared_names
from gradfn.algorithms._songoku._step import (
    TaskGrads,
    _guarded,
    active_mask,
    group_weights,
    step,
)
from gradfn.autodiff._losses import loss_list, stack_losses
from gradfn.autodiff._usage import reached_leaves
from gradfn.conflict import streamed_sketch
from gradfn.integrations.amp import scale_losses, unscale
from gradfn.tree import leaves as tree_leaves
from gradfn.typing import LossFn, Params, Reducer

__all__ = [
    "ROWS_PATHS",
    "check_streaming",
    "choose_rows",
    "sketched",
    "streaming_step",
    "usage_grads",
]

ROWS_PATHS = ("auto", "rows", "streaming")


def check_streaming(config: SonGokuConfig, what: str) -> None:
    """``ValueError`` (naming ``what``) when ``rows="streaming"`` cannot serve ``config``."""
    if config.sketch_dim is None:
        raise ValueError(
            f"{what}: rows='streaming' needs sketch_dim (the EMA must be sketched: without it "
            "the EMA itself holds K × n); set sketch_dim or use rows='rows'"
        )
    if config.aggregator is not None:
        raise ValueError(
            f"{what}: rows='streaming' does not take an in-group aggregator "
            f"({config.aggregator.name!r} needs the per-task rows); use rows='rows'"
        )
    if config.strategy == "loop":
        raise ValueError(
            f"{what}: rows='streaming' runs one batched backward; `strategy` must be 'auto' or "
            "'vmap', got 'loop'"
        )


def choose_rows(
    rows: str, memory_budget: int | None, config: SonGokuConfig, params: list[Tensor], what: str
) -> str:
    """``"rows"`` or ``"streaming"``. ``"auto"``: streaming (with a warning) when ``config`` allows
    it (``sketch_dim`` set, no aggregator, no loop strategy) and the ``K × n`` rows of ``params``
    exceed ``memory_budget`` bytes (default: the free memory of a CUDA device, none on the CPU)."""
    if isinstance(rows, (list, dict, set)) or rows not in ROWS_PATHS:
        raise ValueError(f"{what}: `rows` must be one of {ROWS_PATHS}, got {rows!r}")
    check_memory_budget(what, memory_budget)
    if rows == "streaming":
        check_streaming(config, what)
    if rows != "auto":
        return rows
    able = config.sketch_dim is not None and config.aggregator is None and config.strategy != "loop"
    over = over_budget(config.num_tasks, params, memory_budget) if able else None
    if over is None:
        return "rows"
    need, budget = over
    warnings.warn(
        f"{what}: the {config.num_tasks} per-task rows need {need / 2**20:.1f} MiB, over the "
        f"memory budget ({budget / 2**20:.1f} MiB): the sketches are taken leaf by leaf "
        "(rows='streaming'); pass rows='rows' or 'streaming' to choose",
        stacklevel=3,
    )
    return "streaming"


def _forward(
    loss_fn: LossFn,
    params: Params,
    batch: Any,
    k: int,
    wrt: Callable[[str], bool],
    loss_scale: Tensor | None,
) -> tuple[dict[str, Tensor], list[Tensor]]:
    """``(leaves, K losses)``: one forward at fresh leaves (``requires_grad`` where ``wrt``)."""
    leaves = {n: p.detach().requires_grad_(wrt(n)) for n, p in params.items()}
    with torch.enable_grad():
        parts = loss_list(scale_losses(loss_fn, loss_scale)(leaves, batch), k)
    return leaves, parts


def _sketch(
    config: SonGokuConfig, parts: list[Tensor], idx: Tensor, shared: dict[str, Tensor]
) -> Tensor:
    """``(R, d_sk)``: the sketches of the rows ``idx``, the shared leaves in the order the row
    path's ``sketch`` visits them (optree's canonical order); the graph is kept."""
    assert config.sketch_dim is not None
    losses = [parts[i] for i in idx.tolist()]
    sk, _ = streamed_sketch(
        losses,
        tree_leaves(shared),
        config.sketch_dim,
        config.seed,
        retain_graph=True,
        gramian=False,
    )
    return sk


def usage_grads(
    config: SonGokuConfig,
    loss_fn: LossFn,
    params: Params,
    batch: Any,
    tasks: Tensor,
    *,
    loss_scale: Tensor | None = None,
    **_: Any,
) -> TaskGrads:
    """:func:`task_grads` without the rows (``rows={}``): the losses and which parameters each
    task in ``tasks`` reaches (``usage``: ``{name: (R,) bool}``), read from the graph of one
    forward, no backward."""
    leaves, parts = _forward(loss_fn, params, batch, config.num_tasks, lambda n: True, loss_scale)
    idx = torch.nonzero(tasks).flatten()
    tensors = list(leaves.values())
    hits = torch.tensor(
        [reached_leaves(parts[i], tensors) for i in idx.tolist()], dtype=torch.bool
    ).reshape(len(idx), len(tensors))
    usage = {n: hits[:, j] for j, n in enumerate(leaves)}
    losses = unscale(stack_losses(parts).detach(), loss_scale)
    return TaskGrads(losses, {}, idx, usage)


def sketched(
    config: SonGokuConfig,
    loss_fn: LossFn,
    params: Params,
    batch: Any,
    tasks: Tensor,
    loss_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(losses (K,), sketches (R, d_sk), idx (R,))`` of the tasks in ``tasks`` w.r.t. the
    shared parameters (a refresh's EMA update), without the rows."""
    names = set(shared_names(config, params))
    leaves, parts = _forward(
        loss_fn, params, batch, config.num_tasks, names.__contains__, loss_scale
    )
    idx = torch.nonzero(tasks).flatten()
    obs = _sketch(config, parts, idx, {n: leaves[n] for n in leaves if n in names})
    losses, obs = unscale((stack_losses(parts).detach(), obs), loss_scale)
    return losses, obs, idx


def streaming_step(
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
) -> tuple[SonGokuState, dict[str, Tensor]]:
    """:func:`~gradfn.algorithms._songoku._step.step` without the rows (module docstring).

    ``grads`` and ``workspace`` are accepted for the driver and not used (the step differentiates
    its own forward). A step that updates no EMA (``ema_mode="refresh"`` off the probe step) is
    the row path's single backward of the group's sum.
    """
    if config.one_backward and probe is None:
        return step(
            config,
            loss_fn,
            state,
            params,
            batch,
            loss_scale=loss_scale,
            reduce=reduce,
            donate=donate,
        )
    k = config.num_tasks
    active = active_mask(state)
    count = active.to(torch.float32).sum()
    red = 1.0 / count if config.reduction == "mean" else torch.ones_like(count)
    names = set(shared_names(config, params))
    ema_mask = active if config.ema_mode == "active" else torch.zeros_like(active)
    if probe is not None:
        ema_mask = ema_mask | probe.to(device=active.device, dtype=torch.bool)
    idx = torch.nonzero(active | ema_mask).flatten()
    leaves, parts = _forward(loss_fn, params, batch, k, lambda n: True, loss_scale)
    obs = _sketch(config, parts, idx, {n: x for n, x in leaves.items() if n in names})
    losses = unscale(stack_losses(parts).detach(), loss_scale)
    lw_state = state.loss_weighting
    if config.loss_weighting is not None:  # its weights come from the averaged losses
        if reduce is not None:
            losses = reduce(losses)
        lw_state, w_lw = group_weights(config, lw_state, losses, active)
    w_sum = active.to(torch.float32) * red
    total: Tensor | None = None
    for i in torch.nonzero(active).flatten().tolist():
        if not parts[i].requires_grad:
            continue
        term = parts[i] * w_sum[i].to(parts[i].dtype)
        if config.loss_weighting is not None:
            term = term * w_lw[i].to(parts[i].dtype)
        total = term if total is None else total + term
    tensors = list(leaves.values())
    got = (
        (None,) * len(tensors)
        if total is None
        else torch.autograd.grad(total, tensors, allow_unused=True)
    )
    out = {
        n: torch.zeros_like(x) if g is None else g
        for (n, x), g in zip(leaves.items(), got, strict=True)
    }
    obs, out = unscale((obs, out), loss_scale)
    if reduce is not None:  # linear in the sketches and the gradient: averaged after
        if config.loss_weighting is None:
            losses, obs, out = reduce((losses, obs, out))
        else:
            obs, out = reduce((obs, out))
    return _guarded(
        config,
        state,
        losses,
        out,
        obs,
        idx,
        active,
        ema_mask,
        (state.aggregator, lw_state),
        donate,
    )
