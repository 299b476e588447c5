"""SON-GOKU and GradientConductor on parameters sharded with FSDP2 (``fully_shard``).

Both use the mechanism of :func:`gradfn.integrations.fsdp.per_task_backward`: each per-task row
comes from an ordinary ``backward`` (FSDP all-gathers the parameters and reduce-scatters the row
into the sharded ``p.grad``, averaged over the ranks), and each rank keeps its shard ``J_r``
(``R × n/W``). Everything the algorithms decide reads only sums over the ranks of small
quantities computed from the shards (``psum``: one all-reduce each), so every rank takes the same
decisions, and they are those of one process on the union of the ranks' batches:

* SON-GOKU (arXiv:2509.16959): the EMAs ``e_k`` stay sharded; a refresh needs only their
  Gramian ``Σ_r E_r E_rᵀ`` (``K × K``); the step's update ``Σ_{k∈S_t} g_k`` (Eq. 6) is a sum of
  the rank's own rows.
* GCond (arXiv:2509.07252): the accumulators ``A_k`` stay sharded; the resolution works on the
  summed Gramian and cross-Gramian (``2K²`` floats); the output's norm and the Lion branch's
  per-tensor norms are sums of the shards' squared norms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradfn._internal.checks import check_bool
from gradfn.aggregators._backward_inputs import loss_list
from gradfn.algorithms._conductor import ConductorConfig, ConductorState
from gradfn.algorithms._conductor._process import init_state as conductor_init
from gradfn.algorithms._conductor._process import make_process
from gradfn.algorithms._songoku import SonGokuConfig, SonGokuState, active_mask, make_config
from gradfn.algorithms._songoku._driver import refresh_due
from gradfn.algorithms._songoku._recolor import recolor
from gradfn.algorithms._songoku._state import init_state as songoku_init
from gradfn.algorithms._songoku._step import TaskGrads, step
from gradfn.integrations.fsdp import _as_grad, _group, _local, _named, _rows

__all__ = ["conductor_backward", "songoku_backward"]

Psum = Callable[[Tensor], Tensor]


def _psum(group: Any, all_reduce: bool, where: str) -> tuple[Psum | None, int]:
    """``(psum, W)``: the sum over the ranks of the group (None: one rank, or ``all_reduce``
    off, the control that decides from each rank's shards only)."""
    if not isinstance(all_reduce, bool):
        raise TypeError(f"{where}: `all_reduce` must be a bool, got {all_reduce!r}")
    world = 1 if group is None else dist.get_world_size(group)
    if world == 1 or not all_reduce:
        return None, 1

    def psum(x: Tensor) -> Tensor:
        out = x.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    return psum, world


def _unflatten(flat: Tensor, local: dict[str, Tensor]) -> dict[str, Tensor]:
    """``(R, n_r)`` rows as ``{name: (R, *shard shape)}`` views."""
    out, offset = {}, 0
    for name, t in local.items():
        out[name] = flat[:, offset : offset + t.numel()].reshape((flat.shape[0], *t.shape))
        offset += t.numel()
    return out


def _per_task(
    named: dict[str, Tensor],
    losses: list[Tensor],
    dtype: torch.dtype | None = None,
    reached: dict[int, list[bool]] | None = None,
) -> Tensor:
    """``(len(losses), n_r)``: this rank's shards of the losses' gradients (``p.grad`` kept);
    ``reached[j]``: the parameters loss ``j``'s backward reached."""
    params = list(named.values())
    prior = [p.grad for p in params]
    try:
        rows = _rows(losses, params, [], reached)
    finally:
        for p, g in zip(params, prior, strict=True):
            p.grad = g
    return rows if dtype is None else rows.to(dtype)


def _write(
    named: dict[str, Tensor], out: Mapping[str, Tensor], touched: list[bool] | None = None
) -> dict[str, Tensor]:
    """``p.grad += out[name]`` (the rank's shard, a ``DTensor`` when ``p`` is one); a parameter
    not ``touched`` whose ``p.grad`` is None keeps None (and is left out of the result)."""
    grads = {}
    with torch.no_grad():
        for q, (name, p) in enumerate(named.items()):
            if touched is not None and not touched[q] and p.grad is None:
                continue
            part = out[name].to(p.dtype)
            if p.grad is not None:
                part = part + _local(p.grad)  # type: ignore[operator]
            p.grad = _as_grad(p, part)
            grads[name] = p.grad
    return grads


def songoku_backward(
    losses: Any,
    model: nn.Module | Mapping[str, Tensor],
    config: SonGokuConfig | None = None,
    state: SonGokuState | None = None,
    *,
    all_reduce: bool = True,
    donate_state: bool = False,
    **options: Any,
) -> tuple[SonGokuState, dict[str, Tensor]]:
    """One SON-GOKU step (arXiv:2509.16959) on an FSDP2 model; ``p.grad += g`` (sharded).

    Args:
        losses: the ``K`` task losses of one forward on the rank's batch (mean-reduced: with equal
            per-rank batches the step equals one process on the union of the batches). Only the
            active group's losses (and, with ``ema_mode="refresh"``, every loss on a refresh
            step) are differentiated: one backward each.
        model: the ``fully_shard``-ed module or a name → parameter mapping.
        config: a :class:`~gradfn.algorithms.SonGokuConfig`, or its fields as ``options``. Not
            supported: ``sketch_dim`` (a sketch of shards is not the shards of a sketch) and an
            in-group aggregator that is not a weighting of the Gramian.
        state: the state the previous call returned (None: a fresh one). Its EMAs are this
            rank's shards (``K × n/W``); everything else is the same on every rank.
        all_reduce: sum the ranks' partial Gramians and skip flags and average the losses;
            ``False`` decides from each rank's shards only (wrong; for tests and ablations).
        donate_state: update the EMAs in place (the state passed in is given up).

    Returns:
        ``(state, grads)``: ``grads`` maps names to the rank's new ``p.grad``. A parameter that
        no active task reaches (an inactive task's head) keeps ``p.grad`` None, as in the
        paper, so that a momentum optimizer does not move it; it is left out of ``grads``. A
        skipped step (a non-finite loss or gradient on any rank) adds zeros to the others.
        Communication per step: one backward
        per differentiated task, one all-reduce of ``K`` losses and one of the skip flag, plus
        one of ``K²`` floats on a refresh (every ``R`` steps) or with a Gramian aggregator.
    """
    where = "songoku_backward"
    check_bool("donate_state", donate_state)
    cfg = _songoku_config(config, options, where)
    named = _named(model, where)
    psum, world = _psum(_group(named, where), all_reduce, where)
    items = loss_list(losses)
    k = cfg.num_tasks
    if len(items) != k:
        raise ValueError(f"{where}: `losses` holds {len(items)} losses, the config has K={k}")
    local = {n: _local(p).detach() for n, p in named.items()}  # type: ignore[union-attr]
    if state is None:
        state = songoku_init(cfg, local)
    elif not isinstance(state, SonGokuState):
        raise TypeError(f"{where}: `state` must be a SonGokuState, got {type(state).__name__}")
    due = refresh_due(cfg, state)
    active = active_mask(state)
    probe = torch.ones_like(active) if due and cfg.ema_mode == "refresh" else None
    needed = active if cfg.ema_mode == "active" or probe is None else active | probe
    idx = torch.nonzero(needed).flatten()
    ids, on = idx.tolist(), active.tolist()  # one host transfer each
    reached: dict[int, list[bool]] = {}
    rows = _per_task(named, [items[i] for i in ids], reached=reached)
    # the parameters some active task reaches (alike on every rank: the same graph)
    hit = [reached[j] for j, i in enumerate(ids) if on[i] and j in reached]
    touched = [any(col) for col in zip(*hit, strict=True)] if hit else [False] * len(named)
    values = torch.stack([loss.detach().float().reshape(()) for loss in items])
    if psum is not None:
        values = psum(values) / world
    grads = TaskGrads(values, _unflatten(rows, local), idx)
    state, out = step(
        cfg, _no_loss_fn, state, local, None, probe, grads=grads, psum=psum, donate=donate_state
    )
    if due and not bool(state.skipped):
        state = recolor(cfg, state, psum)
    return state, _write(named, out, touched)


def _songoku_config(config: Any, options: dict[str, Any], where: str) -> SonGokuConfig:
    if config is None:
        config = make_config(options)
    elif options:
        raise TypeError(f"{where}: give a `config` or keyword options, not both")
    elif not isinstance(config, SonGokuConfig):
        raise TypeError(f"{where}: `config` must be a SonGokuConfig, got {type(config).__name__}")
    if config.sketch_dim is not None:
        raise ValueError(
            f"{where}: `sketch_dim` is not supported on sharded parameters; the dense EMAs are "
            "sharded already (K × n/W per rank)"
        )
    agg = config.aggregator
    if agg is not None and agg.weighting is None:
        raise ValueError(
            f"{where}: the in-group aggregator {agg.name!r} needs the full per-task rows; on FSDP "
            "only None (the group sum) or a weighting of the Gramian (upgrad, mgda, ...)"
        )
    return config


def _no_loss_fn(params: Any, batch: Any) -> Any:
    raise AssertionError("the per-task gradients are given")  # pragma: no cover


def conductor_backward(
    microbatch_losses: Iterable[Any],
    model: nn.Module | Mapping[str, Tensor],
    config: ConductorConfig | None = None,
    state: ConductorState | None = None,
    *,
    all_reduce: bool = True,
    **options: Any,
) -> tuple[ConductorState, dict[str, Tensor]]:
    """One GradientConductor cycle (arXiv:2509.07252) on an FSDP2 model; ``p.grad += g``.

    Args:
        microbatch_losses: ``N`` items (``accumulation_steps``), each the ``K`` losses of one
            forward on the rank's micro-batch; a generator runs each forward when its item is
            needed. Classic mode differentiates every loss of every micro-batch, stochastic mode
            loss ``k`` on its own block of ``N/K`` micro-batches (one backward each).
        model: the ``fully_shard``-ed module or a name → parameter mapping.
        config: a :class:`~gradfn.algorithms.ConductorConfig` (``resolution="gramian"``; the
            vector passes of bfloat16 accumulators are not supported), or ``lambdas`` and its
            fields as ``options``.
        state: the state the previous call returned (None: a fresh one); its previous gradients
            and momentum are this rank's shards, everything else the same on every rank.
        all_reduce: sum the Gramians and norms and average the losses over the ranks; ``False``
            decides from each rank's shards only (wrong; for tests and ablations).

    Returns:
        ``(state, grads)``: ``grads`` maps names to the rank's new ``p.grad`` (a skipped cycle
        adds zeros). Communication per cycle: the backward passes, one all-reduce of ``K``
        losses, one of ``2K²`` floats (Gramian and cross-Gramian), one of the output's squared
        norm, and with ``use_lion`` one of ``2P`` squared norms (``P`` parameters).
    """
    where = "conductor_backward"
    cfg = _conductor_config(config, options, where)
    named = _named(model, where)
    psum, world = _psum(_group(named, where), all_reduce, where)
    local = {n: _local(p).detach() for n, p in named.items()}  # type: ignore[union-attr]
    if state is None:
        state = conductor_init(cfg, local)
    elif not isinstance(state, ConductorState):
        raise TypeError(f"{where}: `state` must be a ConductorState, got {type(state).__name__}")
    k, n, dt = cfg.num_tasks, cfg.accumulation_steps, cfg.accumulation_dtype
    if isinstance(microbatch_losses, (str, bytes)) or not isinstance(microbatch_losses, Iterable):
        raise TypeError(f"{where}: `microbatch_losses` must be an iterable of N loss lists")
    if hasattr(microbatch_losses, "__len__") and len(microbatch_losses) != n:  # type: ignore[arg-type]
        raise ValueError(
            f"{where}: `microbatch_losses` holds {len(microbatch_losses)} items but "  # type: ignore[arg-type]
            f"accumulation_steps={n}"
        )
    block = n // k if cfg.stochastic else n  # the micro-batches each loss is averaged over
    acc = torch.zeros((k, sum(t.numel() for t in local.values())), dtype=dt)
    acc = acc.to(next(iter(local.values())).device)
    raw = torch.zeros(k, dtype=torch.float32, device=acc.device)
    it = iter(microbatch_losses)
    for i in range(n):
        item = next(it, None)
        if item is None:
            raise ValueError(f"{where}: `microbatch_losses` ended after {i} of N={n} items")
        items = loss_list(item)
        if len(items) != k:
            raise ValueError(f"{where}: micro-batch {i} gives {len(items)} losses, K={k}")
        tasks = [i // block] if cfg.stochastic else list(range(k))
        acc[tasks] += _per_task(named, [items[t] for t in tasks], dt)
        raw[tasks] += torch.stack([items[t].detach().float().reshape(()) for t in tasks]) / block
    lam = torch.tensor(cfg.lambdas, dtype=torch.float32, device=acc.device)
    acc.mul_((lam / block).to(dt)[:, None])
    if psum is not None:
        raw = psum(raw) / world
    process = make_process(cfg, psum=psum)
    state, out = process(state, _unflatten(acc, local), raw * lam, raw, local)
    return state, _write(named, out)


def _conductor_config(config: Any, options: dict[str, Any], where: str) -> ConductorConfig:
    if config is None:
        try:
            config = ConductorConfig(**options)
        except TypeError as err:
            raise TypeError(f"{where}: {err}") from None
    elif options:
        raise TypeError(f"{where}: give a `config` or keyword options, not both")
    elif not isinstance(config, ConductorConfig):
        raise TypeError(f"{where}: `config` must be a ConductorConfig, got {type(config).__name__}")
    if config.resolves_vectors or config.accumulation_dtype == torch.bfloat16:
        raise ValueError(
            f"{where}: bfloat16 accumulators and resolution='vectors' are not supported on "
            "sharded parameters; use accumulation_dtype float32 or float64 (resolution='gramian')"
        )
    return config
