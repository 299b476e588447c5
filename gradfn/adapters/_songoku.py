"""``SonGokuScheduler``: SON-GOKU for ``nn.Module`` training, with the reference implementation's
constructor names and calls (switching is one import). The docs' SON-GOKU guide lists every
difference from the reference, one line each."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradfn.adapters import _checkpoints
from gradfn.adapters._common import (
    check_amp,
    loss_scale,
    reducer,
    trainable,
    unwrap,
    write_grads,
)
from gradfn.adapters._reference_io import append_jsonl, dump_graph, flat_hook_aggregator
from gradfn.adapters._tasks import TaskSpec, check_tasks, task_losses
from gradfn.aggregators import aggregator
from gradfn.algorithms import SonGoku, SonGokuState, songoku
from gradfn.algorithms._songoku import active_mask, group_lists, make_config, task_grads
from gradfn.autodiff import functional_loss
from gradfn.schedules import TauSchedule

__all__ = ["SonGokuScheduler"]

_BASE_METHODS = ("vanilla", "none", "pcgrad", "pcgrad_sum", "adatask", "inverse_norm")


class SonGokuScheduler:
    """SON-GOKU scheduler for an ``nn.Module`` (the reference's API; docs: SON-GOKU guide).

    Beyond the reference's arguments (keyword-only): ``ema_mode``, ``reduction``, ``graph_rule``,
    ``graph_quantile``, ``graph_knn_k``, ``graph_density``, ``sketch_dim``, ``seed``,
    ``legacy_pointer``, ``strategy`` (the :class:`~gradfn.algorithms.SonGokuConfig` fields),
    ``ddp_sync`` (``"avg"`` / ``"none"``) and ``process_group`` (distributed training),
    ``autocast_dtype`` and ``scaler`` (mixed precision). ``device`` is accepted for compatibility.
    Which parameters each task touches is read from autograd during the first step (every task is
    active then): parameters two or more tasks use are shared, the others are heads.
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: Sequence[TaskSpec],
        optimizer: torch.optim.Optimizer,
        shared_param_filter: Callable[[nn.Parameter], bool] | None = None,
        refresh_period: int = 32,
        tau_schedule: TauSchedule | None = None,
        ema_beta: float = 0.9,
        min_updates_per_cycle: int = 1,
        base_method: str = "vanilla",
        eps_cosine: float = 1e-12,
        gradient_transform: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
        device: Any = None,
        dump_graph_dir: str | None = None,
        log_interval: int | None = None,
        log_path: str | None = None,
        *,
        ddp_sync: str = "avg",
        process_group: Any = None,
        autocast_dtype: torch.dtype | None = None,
        scaler: Any = None,
        **options: Any,
    ) -> None:
        self._module, ddp, process_group = unwrap(model, process_group)
        if ddp_sync not in ("avg", "none"):
            raise ValueError(f"`ddp_sync` must be 'avg' or 'none', got {ddp_sync!r}")
        self.scaler = check_amp(autocast_dtype, scaler)
        self.tasks = check_tasks(tasks)
        if not (hasattr(optimizer, "step") and hasattr(optimizer, "zero_grad")):
            raise TypeError("`optimizer` must be a torch optimizer (with step and zero_grad)")
        for name, fn in (("shared_param_filter", shared_param_filter), ("gradient_transform", gradient_transform)):
            if fn is not None and not callable(fn):
                raise TypeError(f"`{name}` must be callable or None")
        if tau_schedule is not None and not isinstance(tau_schedule, TauSchedule):
            raise TypeError(f"`tau_schedule` must be a TauSchedule or None, got {type(tau_schedule).__name__}")
        if base_method not in _BASE_METHODS:
            raise ValueError(f"`base_method` must be one of {sorted(_BASE_METHODS)}, got {base_method!r}")
        if log_interval is not None and (not isinstance(log_interval, int) or log_interval < 1):
            raise ValueError(f"`log_interval` must be a positive integer or None, got {log_interval!r}")
        self.model, self.optimizer, self.device = model, optimizer, device
        self.shared_param_filter = shared_param_filter
        self.tau_schedule = tau_schedule if tau_schedule is not None else TauSchedule()
        self.dump_graph_dir, self.log_interval, self.log_path = dump_graph_dir, log_interval, log_path
        self.names = [t.name for t in self.tasks]
        self._index = {n: i for i, n in enumerate(self.names)}
        self._named = trainable(self._module)
        self._reduce = reducer(ddp, process_group) if ddp_sync == "avg" else None
        self.ddp_sync, self.autocast_dtype, self.base_method = ddp_sync, autocast_dtype, base_method
        self._params, self._f = functional_loss(
            self._module, task_losses(self.tasks, autocast_dtype, self._named[0][1].device.type)
        )
        agg: dict[str, Any] = {}
        if base_method in ("pcgrad", "pcgrad_sum"):
            mean = "mean" if base_method == "pcgrad" else "sum"
            agg = {"aggregator": aggregator("pcgrad", seed=options.get("seed", 0), reduction=mean)}
        elif base_method in ("adatask", "inverse_norm"):
            agg = {"aggregator": aggregator("inverse_norm"), "weight_heads": True}
        elif gradient_transform is not None:
            agg = {"aggregator": flat_hook_aggregator(gradient_transform, self.names)}
        self._config = make_config(
            dict(num_tasks=len(self.tasks), refresh_period=refresh_period, tau_schedule=self.tau_schedule,
                 ema_beta=ema_beta, min_updates_per_cycle=min_updates_per_cycle, eps=eps_cosine,
                 per_task_rows="active", **agg, **options)
        )
        self.refresh_period, self.min_updates_per_cycle = refresh_period, min_updates_per_cycle
        self.ema_mode = self._config.ema_mode
        self._algo: SonGoku | None = None
        self._state: SonGokuState | None = None
        self._usage: Tensor | None = None  # (K, P) bool: task k's loss reaches parameter p
        self._shared_names: list[str] = []
        self._heads: list[list[str]] = [[] for _ in self.tasks]

    # --- setup: shared parameters and heads, from the first step's autograd graph -------------

    def _build(self, usage: Tensor, shared: list[str], heads: list[list[str]]) -> None:
        self._usage, self._shared_names, self._heads = usage, shared, heads
        config = dataclasses.replace(self._config, shared=frozenset(shared))
        self._algo = songoku(self._f, config, reduce=self._reduce, donate_state=True)

    def _setup(self, batches: Mapping[str, Any], scale: Tensor | None) -> Any:
        missing = [n for n in self.names if n not in batches]
        if missing:
            raise ValueError(
                f"step: the first step trains every task, so batches_by_task needs a batch for each; missing {missing}"
            )
        every = torch.ones(len(self.tasks), dtype=torch.bool, device=self._named[0][1].device)
        first = task_grads(self._config, self._f, self._params, batches, every, loss_scale=scale, return_usage=True)
        names = [n for n, _ in self._named]
        usage = torch.stack([first.usage[n].cpu() for n in names], dim=1)
        counts = usage.sum(dim=0)
        if self.shared_param_filter is not None:
            shared = [n for n, p in self._named if self.shared_param_filter(p)]
        else:
            shared = [n for j, n in enumerate(names) if counts[j] >= min(2, len(self.tasks))]
        if not shared:
            raise ValueError(
                "no shared parameter: no parameter is used by two or more tasks (or "
                "shared_param_filter selects none); pass a shared_param_filter"
            )
        heads = [
            [n for n, p in self._named if spec.head_param_filter(p)]
            if spec.head_param_filter is not None
            else [n for j, n in enumerate(names) if usage[i, j] and counts[j] == 1 and n not in shared]
            for i, spec in enumerate(self.tasks)
        ]
        self._build(usage, shared, heads)
        assert self._algo is not None
        self._state = self._algo.init(self._params)
        return first

    # --- training step ----------------------------------------------------------------------

    def _check_batches(self, batches: Any) -> None:
        if not isinstance(batches, Mapping):
            raise TypeError(f"batches_by_task must be a dict {{task name: batch}}, got {type(batches).__name__}")
        unknown = [n for n in batches if n not in self._index]
        if unknown:
            raise ValueError(f"batches_by_task: unknown task names {unknown}; tasks are {self.names}")

    def _mask(self, names: list[str]) -> Tensor:
        mask = torch.zeros(len(self.tasks), dtype=torch.bool, device=self._named[0][1].device)
        mask[[self._index[n] for n in names]] = True
        return mask

    def step(self, batches_by_task: Mapping[str, Any]) -> dict[str, float]:
        """One SON-GOKU step and one optimizer step; returns ``{task: loss}`` of the active tasks."""
        self._check_batches(batches_by_task)
        scale = loss_scale(self.scaler, self._named[0][1].device)
        first = self._setup(batches_by_task, scale) if self._algo is None else None
        algo, state = self._algo, self._state
        assert algo is not None and state is not None
        active = torch.nonzero(active_mask(state)).flatten().tolist()
        missing = [self.names[i] for i in active if self.names[i] not in batches_by_task]
        if missing:
            raise ValueError(f"batches_by_task: missing batch for active task(s) {missing}")
        used = {self.names[i]: batches_by_task[self.names[i]] for i in active}
        providers = [t for t in self.tasks if t.refresh_batch_provider is not None]
        probe = None
        if algo.refresh_due(state) and self.ema_mode == "refresh":
            extra = [n for n in self.names if n in batches_by_task and self.tasks[self._index[n]].refresh_batch_provider is None]
            used.update({n: batches_by_task[n] for n in extra})
            probe = self._mask(extra)
        refreshes = int(state.refreshes)
        state, _ = algo.update(
            state, self._params, used,
            (lambda: {t.name: t.refresh_batch_provider() for t in providers}) if providers else None,  # type: ignore[misc]
            refresh_tasks=self._mask([t.name for t in providers]) if providers else None,
            probe=probe, apply=lambda st, g: self._apply(st, g, active, scale), loss_scale=scale, grads=first,
        )
        self._state = state
        if int(state.refreshes) != refreshes and self.dump_graph_dir is not None:
            dump_graph(self.dump_graph_dir, int(state.step), float(state.tau), int(state.refreshes), state.adjacency, group_lists(state))
        losses = state.losses.tolist()
        out = {self.names[i]: losses[i] for i in active}
        if self.log_interval is not None and self.log_path is not None and self.t % self.log_interval == 0:
            append_jsonl(self.log_path, {"t": self.t, "losses": out, "classes": self.schedule_snapshot(), "tau": self.current_tau()})
        return out

    def _apply(self, state: SonGokuState, grads: dict[str, Tensor], active: list[int], scale: Tensor | None) -> None:
        """Write ``p.grad`` for the parameters the active tasks reach and step the optimizer."""
        skipped = bool(state.skipped)
        if self.scaler is None and skipped:
            return
        assert self._usage is not None
        heads = {n for i in active for n in self._heads[i]}
        touched = self._usage[active].any(dim=0).tolist()
        write = [hit or name in heads for (name, _), hit in zip(self._named, touched, strict=True)]
        self.optimizer.zero_grad(set_to_none=True)
        write_grads(self._named, grads, write, scale=scale, poison=skipped)
        if self.scaler is None:
            self.optimizer.step()
        else:  # p.grad = g · scale: scaler.step unscales once; +inf on a skip backs the scale off
            self.scaler.step(self.optimizer)
            self.scaler.update()

    # --- accessors --------------------------------------------------------------------------

    def current_groups(self) -> list[list[int]]:
        """The groups in cycle order, as lists of task indices."""
        return [list(range(len(self.tasks)))] if self._state is None else group_lists(self._state)

    def schedule_snapshot(self) -> list[list[str]]:
        """The groups in cycle order, as lists of task names."""
        return [[self.names[i] for i in g] for g in self.current_groups()]

    @property
    def t(self) -> int:
        """Completed steps."""
        return 0 if self._state is None else int(self._state.step)

    def current_tau(self) -> float:
        """``τ(t)`` of the schedule at the current step count."""
        return float(self.tau_schedule.value(self.t))

    @property
    def state(self) -> SonGokuState | None:
        """The functional core's state (None before the first step)."""
        return self._state

    def debug_state(self) -> dict[str, Any]:
        """The reference's ``debug_state()`` keys, plus ``skipped``, ``shared_params``, ``head_params``."""
        return _checkpoints.songoku_debug_state(self)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the schedule (the optimizer has its own state_dict)."""
        return _checkpoints.songoku_state_dict(self)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (also one saved by gradfn 0.1; the task names must match)."""
        _checkpoints.songoku_load_state_dict(self, state_dict)
