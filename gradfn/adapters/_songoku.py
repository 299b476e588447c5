"""``SonGokuScheduler``: SON-GOKU for ``nn.Module`` training, with the reference implementation's
constructor names and calls (switching is one import). The docs' SON-GOKU guide lists every
difference from the reference, one line each."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradfn._internal import checks
from gradfn.adapters import _checkpoints, _songoku_step
from gradfn.adapters._common import (
    check_amp,
    reducer,
    trainable,
    unwrap,
)
from gradfn.adapters._quarantine import Quarantine
from gradfn.adapters._reference_io import flat_hook_aggregator
from gradfn.adapters._tasks import (
    TaskSpec,
    check_tasks,
    shared_and_heads,
    task_losses,
)
from gradfn.algorithms import SonGoku, SonGokuState, songoku
from gradfn.algorithms._songoku import group_lists, make_config, task_grads
from gradfn.algorithms._songoku._config import from_reference
from gradfn.algorithms._songoku._streaming import choose_rows, usage_grads
from gradfn.autodiff import functional_loss
from gradfn.integrations.distributed import check_same_config
from gradfn.schedules import TauSchedule

__all__ = ["SonGokuScheduler"]


class SonGokuScheduler:
    """SON-GOKU scheduler for an ``nn.Module`` (the reference's API; docs: SON-GOKU guide).

    Beyond the reference's arguments (keyword-only): ``ema_mode``, ``reduction``, ``graph_rule``,
    ``graph_quantile``, ``graph_knn_k``, ``graph_density``, ``sketch_dim``, ``seed``,
    ``legacy_pointer``, ``strategy`` (the :class:`~gradfn.algorithms.SonGokuConfig` fields),
    ``ddp_sync`` (``"avg"`` / ``"none"``) and ``process_group`` (distributed training),
    ``autocast_dtype`` and ``scaler`` (mixed precision; a ``scaler`` needs torch ≥ 2.3), ``share_forward`` (default True: tasks
    calling the model, or a direct submodule, on the same input objects share one forward and
    one dropout mask; False: one forward per task), ``quarantine_after`` (None: off; ``n``: a task
    whose loss is non-finite at ``n`` consecutive active steps is left out from then on, so the
    others keep training; docs: Reliability), ``rows`` and ``memory_budget`` (with ``sketch_dim``:
    ``"streaming"`` never holds the ``K × n`` per-task rows; ``"auto"`` picks it, with a warning,
    when they exceed ``memory_budget`` bytes, by default a CUDA device's free memory; the path
    in use is ``self.rows``; docs: Scaling). ``device`` is accepted for compatibility.
    Which parameters each task touches is read from autograd during the first step (every task is
    active then): parameters two or more tasks use are shared, the others are heads.
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: Sequence[TaskSpec],
        optimizer: torch.optim.Optimizer | None = None,
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
        share_forward: bool = True,
        quarantine_after: int | None = None,
        rows: str = "auto",
        memory_budget: int | None = None,
        **options: Any,
    ) -> None:
        self._module, ddp, process_group = unwrap(model, process_group)
        self.share_forward = checks.check_bool("share_forward", share_forward)
        checks.check_choice("ddp_sync", ddp_sync, ("avg", "none"))
        self.scaler = check_amp(autocast_dtype, scaler, "SonGokuScheduler")
        self.tasks = check_tasks(tasks)
        if optimizer is not None and not (
            hasattr(optimizer, "step") and hasattr(optimizer, "zero_grad")
        ):
            raise TypeError(
                "`optimizer` must be a torch optimizer (with step and zero_grad) or None"
            )
        checks.check_callable("shared_param_filter", shared_param_filter, optional=True)
        checks.check_callable("gradient_transform", gradient_transform, optional=True)
        checks.check_optional_int("log_interval", log_interval, 1)
        self.model, self.optimizer, self.device, self.ddp_sync = model, optimizer, device, ddp_sync
        self.shared_param_filter, self.base_method = shared_param_filter, base_method
        self.autocast_dtype, self.dump_graph_dir = autocast_dtype, dump_graph_dir
        self.log_interval, self.log_path = log_interval, log_path
        self.names = [t.name for t in self.tasks]
        self._quarantine = Quarantine(self.names, quarantine_after)
        self._index = {n: i for i, n in enumerate(self.names)}
        self._named = trainable(self._module)
        self._reduce = reducer(ddp, process_group) if ddp_sync == "avg" else None
        device_type = self._named[0][1].device.type
        losses = task_losses(self.tasks, autocast_dtype, device_type, share_forward=share_forward)
        self._params, self._f = functional_loss(self._module, losses)
        if gradient_transform is not None:  # base_method, if given, overrides it (reference)
            options["hook"] = flat_hook_aggregator(gradient_transform, self.names)
        self._config = make_config(
            from_reference(
                len(self.tasks),
                refresh_period=refresh_period,
                tau_schedule=tau_schedule,
                ema_beta=ema_beta,
                min_updates_per_cycle=min_updates_per_cycle,
                base_method=base_method,
                eps_cosine=eps_cosine,
                per_task_rows="active",
                **options,
            )
        )
        self.rows = choose_rows(
            rows, memory_budget, self._config, [*self._params.values()], "SonGokuScheduler"
        )
        check_same_config(
            {"task_names": self.names, "ddp_sync": ddp_sync, "share_forward": share_forward}
            | {"rows": self.rows}
            | {f.name: getattr(self._config, f.name) for f in dataclasses.fields(self._config)},
            group=process_group,
            what="SonGokuScheduler",
        )
        self.tau_schedule, self.ema_mode = self._config.tau_schedule, self._config.ema_mode
        self.refresh_period, self.min_updates_per_cycle = refresh_period, min_updates_per_cycle
        self._algo: SonGoku | None = None
        self._state: SonGokuState | None = None
        self._usage: Tensor | None = None  # (K, P) bool: task k's loss reaches parameter p
        self._shared_names: list[str] = []
        self._heads: list[list[str]] = [[] for _ in self.tasks]
        self._pending: tuple[Tensor | None, Tensor | None] | None = None  # a deferred refresh

    # --- setup: shared parameters and heads, from the first step's autograd graph -------------

    def _build(self, usage: Tensor, shared: list[str], heads: list[list[str]]) -> None:
        self._usage, self._shared_names, self._heads = usage, shared, heads
        config = dataclasses.replace(self._config, shared=frozenset(shared))
        self._algo = songoku(
            self._f, config, reduce=self._reduce, donate_state=True, rows=self.rows
        )

    def _setup(self, batches: Mapping[str, Any], scale: Tensor | None) -> Any:
        missing = [n for n in self.names if n not in batches]
        if missing:
            raise ValueError(
                f"step: the first step trains every task, so batches_by_task needs a batch for each; missing {missing}"
            )
        every = torch.ones(len(self.tasks), dtype=torch.bool, device=self._named[0][1].device)
        first = (usage_grads if self.rows == "streaming" else task_grads)(
            self._config, self._f, self._params, batches, every, loss_scale=scale, return_usage=True
        )
        usage = torch.stack([first.usage[n].cpu() for n, _ in self._named], dim=1)
        shared, heads = shared_and_heads(self._named, usage, self.tasks, self.shared_param_filter)
        self._build(usage, shared, heads)
        assert self._algo is not None
        self._state = self._algo.init(self._params)
        return first

    # --- training step (gradfn.adapters._songoku_step) -------------------------------------

    def _refresh_due(self) -> bool:
        """Does the next step refresh (recolour)?"""
        if self._algo is None or self._state is None:
            return self._config.refresh_period == 1
        return self._algo.refresh_due(self._state)

    def step(self, batches_by_task: Mapping[str, Any]) -> dict[str, float]:
        """One SON-GOKU step and one optimizer step; returns ``{task: loss}`` of the active tasks."""
        if self.optimizer is None:
            raise RuntimeError(
                "step: this SonGokuScheduler has no optimizer (optimizer=None); call "
                "backward(batches_by_task), then step your optimizer yourself"
            )
        return _songoku_step.run(self, batches_by_task, step_optimizer=True)["losses"]

    def backward(self, batches_by_task: Mapping[str, Any]) -> dict[str, Any]:
        """One SON-GOKU step that only writes ``p.grad`` (never steps the optimizer, never calls
        ``zero_grad``); returns ``{"losses": {task: loss}, "active": [task], "skipped": bool,
        "step": int}``. A skipped step leaves every ``p.grad`` None (``+inf`` with a ``scaler``,
        for ``scaler.step`` to skip), so the caller's ``optimizer.step()`` changes nothing."""
        return _songoku_step.run(self, batches_by_task, step_optimizer=False)

    # --- accessors --------------------------------------------------------------------------

    @property
    def quarantined(self) -> list[str]:
        """The tasks left out after ``quarantine_after`` consecutive non-finite losses."""
        return list(self._quarantine.quarantined)

    def release(self, name: str) -> None:
        """Take a quarantined task back into training."""
        self._quarantine.release(name)

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
        """Everything needed to resume the schedule (the optimizer has its own state_dict); after
        :meth:`backward`, call it once the optimizer has stepped (it runs a deferred refresh)."""
        _songoku_step.flush(self)
        return _checkpoints.songoku_state_dict(self)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (also one saved by gradfn 0.1; the task names must match)."""
        self._pending = None
        _checkpoints.songoku_load_state_dict(self, state_dict)
