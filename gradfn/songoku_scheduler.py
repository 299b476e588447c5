"""``SonGokuScheduler``: the SON-GOKU transform for ``nn.Module`` users (DESIGN.md layer 5).

Same constructor names and calls as the reference package's documented scheduler (spec §1.1), so
switching is one import::

    from gradfn import SonGokuScheduler, TaskSpec, TauSchedule

The adapter holds ``(params, state)``, builds one ``K``-loss function from the task specs (each
active task's loss on its own batch; inactive tasks' forwards are not run), calls the functional
core (:func:`gradfn.songoku.songoku`: ``step`` every call, ``refresh`` every ``R`` steps), writes
``p.grad`` and calls ``optimizer.step()``.

Differences from the reference (spec §5), one line each:

* each refresh window starts at group 0 (``legacy_pointer=True`` restores the start at group 1);
* ``refresh_batch_provider`` works (the reference's refresh crashes when one is given);
* heads are found automatically when no head filter is given (parameters only that task's loss
  touches), and gradients an active task puts on any parameter are kept (never silently frozen);
  with no ``shared_param_filter`` the shared set is the parameters used by two or more tasks;
* parameters that no active task touches get ``p.grad = None`` (no optimizer move), shared ones
  included;
* ``base_method="pcgrad"`` averages over the group (``"pcgrad_sum"`` sums, like the reference)
  and draws its order from the state's seed, not Python's global ``random``;
* ``TauSchedule(kind="constant")`` is constant; out-of-range values raise;
* a non-finite loss or gradient skips the step (no optimizer step, state unchanged);
* ``state_dict()`` / ``load_state_dict()`` checkpoint the whole schedule (EMA, groups, counters).

Distributed training (``torch.distributed``, gloo or NCCL): a model wrapped in
``DistributedDataParallel`` is unwrapped (the forward goes through ``model.module`` with
substituted parameters, so DDP's own gradient hooks never fire), and with ``ddp_sync="avg"`` (the
default) the adapter averages per-task gradients across ranks before every decision, as
:func:`gradfn.songoku.songoku` documents (its ``reduce``); a plain module works the same once a
process group is initialised (before the scheduler is built). ``ddp_sync="none"`` keeps every
rank on its own gradients. Buffers (BatchNorm statistics) are not synchronised.

Mixed precision: ``autocast_dtype`` (``torch.bfloat16``, or ``torch.float16`` on GPU) runs every
task's loss under ``torch.autocast``; ``scaler`` (a ``torch.amp.GradScaler``) scales the losses
before differentiation, every decision uses unscaled gradients, ``p.grad`` receives the final
gradient times the scale and ``scaler.step(optimizer)`` unscales it once and steps, then
``scaler.update()`` adjusts the scale. A step with a non-finite gradient leaves the scheduler's
state unchanged and writes non-finite gradients, so ``scaler.step`` skips the optimizer step and
``scaler.update`` lowers the scale, exactly as with a plain ``scaler.scale(loss).backward()``.

Which parameters each task touches is found once, at the first ``step`` (every task is active at
step 0, so all batches are there), by one extra forward and backward per task that leaves the
random number generators and BatchNorm statistics as they were.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optree
import torch
from torch import Tensor, nn

from gradfn.amp import poison_like
from gradfn.autodiff import functional_loss
from gradfn.distributed import is_distributed, make_reducer
from gradfn.schedules import TauSchedule
from gradfn.songoku import SonGokuState, songoku

__all__ = ["SonGokuScheduler", "TaskSpec", "TauSchedule"]

_BASE_METHODS = {
    "vanilla": None,
    "none": None,
    "pcgrad": "pcgrad",
    "pcgrad_sum": "pcgrad_sum",
    "adatask": "inverse_norm",
    "inverse_norm": "inverse_norm",
}


@dataclass
class TaskSpec:
    """One task: ``loss_fn(model, batch) -> scalar Tensor``.

    ``refresh_batch_provider()`` (optional) returns a fresh batch used at each refresh to update
    this task's EMA; ``head_param_filter(parameter) -> bool`` (optional) marks its head.
    """

    name: str
    loss_fn: Callable[[nn.Module, Any], Tensor]
    refresh_batch_provider: Callable[[], Any] | None = None
    head_param_filter: Callable[[nn.Parameter], bool] | None = None


def _check_tasks(tasks: Any) -> list[TaskSpec]:
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence):
        raise TypeError(f"`tasks` must be a list of TaskSpec, got {type(tasks).__name__}")
    tasks = list(tasks)
    if not tasks:
        raise ValueError("`tasks` is empty: SON-GOKU needs at least one TaskSpec")
    seen: set[str] = set()
    for i, spec in enumerate(tasks):
        if not isinstance(spec, TaskSpec):
            raise TypeError(f"`tasks[{i}]` must be a TaskSpec, got {type(spec).__name__}")
        if not isinstance(spec.name, str) or not spec.name:
            raise ValueError(f"`tasks[{i}].name` must be a non-empty string, got {spec.name!r}")
        if spec.name in seen:
            raise ValueError(f"`tasks`: duplicate task name {spec.name!r}")
        seen.add(spec.name)
        if not callable(spec.loss_fn):
            raise TypeError(f"task {spec.name!r}: `loss_fn` must be callable")
        for field in ("refresh_batch_provider", "head_param_filter"):
            value = getattr(spec, field)
            if value is not None and not callable(value):
                raise TypeError(f"task {spec.name!r}: `{field}` must be callable or None")
    return tasks


class SonGokuScheduler:
    """SON-GOKU scheduler for an ``nn.Module`` (reference API, spec §1.1; module docstring).

    Args beyond the reference's: ``ema_mode`` (``"active"``: paper, EMAs of the active tasks
    every step; ``"refresh"``: every task probed once per refresh window, the cheap mode),
    ``reduction`` (``"sum"`` / ``"mean"``), ``graph_rule`` / ``graph_quantile`` / ``graph_knn_k``
    / ``graph_density``, ``sketch_dim``, ``seed``, ``legacy_pointer``, ``strategy``,
    ``ddp_sync`` (``"avg"`` / ``"none"``) and ``process_group`` (distributed training),
    ``autocast_dtype`` and ``scaler`` (mixed precision; module docstring). ``device`` is
    accepted for compatibility (the state lives on the parameters' device).
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
        ema_mode: str = "active",
        reduction: str = "sum",
        graph_rule: str = "threshold",
        graph_quantile: float = 0.3,
        graph_knn_k: int = 3,
        graph_density: float | None = None,
        sketch_dim: int | None = None,
        seed: int = 0,
        legacy_pointer: bool = False,
        strategy: str = "auto",
        ddp_sync: str = "avg",
        process_group: Any = None,
        autocast_dtype: torch.dtype | None = None,
        scaler: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
        if ddp_sync not in ("avg", "none"):
            raise ValueError(f"`ddp_sync` must be 'avg' or 'none', got {ddp_sync!r}")
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(
                f"`autocast_dtype` must be None, torch.bfloat16 or torch.float16, got "
                f"{autocast_dtype!r}"
            )
        if scaler is not None and not all(
            hasattr(scaler, a) for a in ("scale", "step", "update", "is_enabled")
        ):
            raise TypeError("`scaler` must be a torch.amp.GradScaler or None")
        self.tasks = _check_tasks(tasks)
        if not (hasattr(optimizer, "step") and hasattr(optimizer, "zero_grad")):
            raise TypeError("`optimizer` must be a torch optimizer (with step and zero_grad)")
        if shared_param_filter is not None and not callable(shared_param_filter):
            raise TypeError("`shared_param_filter` must be callable or None")
        if tau_schedule is not None and not isinstance(tau_schedule, TauSchedule):
            raise TypeError(
                f"`tau_schedule` must be a TauSchedule or None, got {type(tau_schedule).__name__}"
            )
        if base_method not in _BASE_METHODS:
            raise ValueError(
                f"`base_method` must be one of {sorted(_BASE_METHODS)}, got {base_method!r}"
            )
        if gradient_transform is not None and not callable(gradient_transform):
            raise TypeError("`gradient_transform` must be callable or None")
        if log_interval is not None and (not isinstance(log_interval, int) or log_interval < 1):
            raise ValueError(
                f"`log_interval` must be a positive integer or None, got {log_interval!r}"
            )
        self.model = model
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self._module: nn.Module = model.module if ddp else model
        if process_group is None and ddp:
            process_group = model.process_group
        self.ddp_sync = ddp_sync
        self.autocast_dtype = autocast_dtype
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        reduce = (
            make_reducer(process_group)
            if ddp_sync == "avg" and (ddp or is_distributed(process_group))
            else None
        )
        self.optimizer = optimizer
        self.shared_param_filter = shared_param_filter
        self.tau_schedule = tau_schedule if tau_schedule is not None else TauSchedule()
        self.refresh_period = refresh_period
        self.min_updates_per_cycle = min_updates_per_cycle
        self.ema_mode = ema_mode
        self.base_method = base_method
        self.dump_graph_dir = dump_graph_dir
        self.log_interval = log_interval
        self.log_path = log_path
        self.device = device
        self.names = [t.name for t in self.tasks]
        self._index = {n: i for i, n in enumerate(self.names)}
        self._named = [(n, p) for n, p in self._module.named_parameters() if p.requires_grad]
        if not self._named:
            raise ValueError("`model` has no trainable parameter")
        self._user_hook = gradient_transform
        builtin = _BASE_METHODS[base_method]
        transform = (
            builtin
            if builtin is not None
            else (self._wrap_hook(gradient_transform) if gradient_transform is not None else None)
        )
        params, self._f = functional_loss(self._module, self._all_losses)
        self._params = params
        self._shared_names: list[str] = []
        self._shared_set: frozenset[str] = frozenset()
        self._tx = songoku(
            self._f,
            num_tasks=len(self.tasks),
            shared=lambda name: name in self._shared_set,
            refresh_period=refresh_period,
            tau_schedule=self.tau_schedule,
            ema_beta=ema_beta,
            ema_mode=ema_mode,  # type: ignore[arg-type]
            min_updates_per_cycle=min_updates_per_cycle,
            gradient_transform=transform,
            reduction=reduction,  # type: ignore[arg-type]
            graph_rule=graph_rule,  # type: ignore[arg-type]
            graph_quantile=graph_quantile,
            graph_knn_k=graph_knn_k,
            graph_density=graph_density,
            sketch_dim=sketch_dim,
            seed=seed,
            eps=eps_cosine,
            strategy=strategy,  # type: ignore[arg-type]
            per_task_rows="active",
            legacy_pointer=legacy_pointer,
            reduce=reduce,
            donate_state=True,  # the scheduler never reuses an old state
            guard_grads=False,  # a skipped step's gradients are never written
        )
        self._state: SonGokuState | None = None
        self._usage: Tensor | None = None  # (K, P) bool: task k's loss touches parameter p
        self._heads: list[list[str]] = [[] for _ in self.tasks]

    # ----------------------------------------------------------------------------------------
    # the K-loss function handed to the core

    def _all_losses(self, module: nn.Module, batches: Mapping[str, Any]) -> list[Tensor]:
        """Losses of the tasks present in ``batches`` (the others are a constant 0).

        A list, not a stack: each task's backward then visits only its own part of the graph.
        """
        out: list[Tensor | None] = []
        for spec in self.tasks:
            if spec.name not in batches:
                out.append(None)
                continue
            if self.autocast_dtype is None:
                loss = spec.loss_fn(module, batches[spec.name])
            else:
                with torch.autocast(self._named[0][1].device.type, dtype=self.autocast_dtype):
                    loss = spec.loss_fn(module, batches[spec.name])
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise TypeError(
                    f"task {spec.name!r}: loss_fn must return a scalar Tensor, got "
                    f"{type(loss).__name__ if not isinstance(loss, Tensor) else tuple(loss.shape)}"
                )
            loss = loss.reshape(())
            out.append(loss.float() if self.autocast_dtype is not None else loss)
        ref = next(x for x in out if x is not None)
        zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
        return [zero if x is None else x for x in out]

    def _wrap_hook(self, user: Callable) -> Callable:
        """Adapt the reference's hook ``{task: flat shared grad} -> {task: flat}`` to the core's."""

        def hook(stacked: dict[str, Tensor], active: Tensor) -> dict[str, Tensor]:
            names = list(stacked)
            sizes = [stacked[n][0].numel() for n in names]
            idx = torch.nonzero(active).flatten().tolist()
            flat = {
                self.names[i]: torch.cat([stacked[n][i].reshape(-1) for n in names]) for i in idx
            }
            out = user(flat)
            if not isinstance(out, Mapping):
                raise TypeError("gradient_transform must return a dict {task name: flat gradient}")
            rows = []
            for i, task in enumerate(self.names):
                vec = out.get(task) if i in idx else None
                if vec is None:
                    vec = torch.zeros(
                        sum(sizes), dtype=stacked[names[0]].dtype, device=stacked[names[0]].device
                    )
                rows.append(vec.reshape(-1))
            full = torch.stack(rows)
            parts = torch.split(full, sizes, dim=1)
            return {n: part.reshape(stacked[n].shape) for n, part in zip(names, parts, strict=True)}

        return hook

    # ----------------------------------------------------------------------------------------
    # setup: which parameters each task touches; shared set and heads

    def _detect_usage(self, batches: Mapping[str, Any]) -> Tensor:
        names = [n for n, _ in self._named]
        usage = torch.zeros(len(self.tasks), len(names), dtype=torch.bool)
        _, frozen = functional_loss(
            self._module, lambda m, b: self._all_losses(m, b), freeze_running_stats=True
        )
        devices = sorted({p.device.index for _, p in self._named if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            for k, spec in enumerate(self.tasks):
                leaves = {n: self._params[n].detach().requires_grad_(True) for n in names}
                loss = frozen(leaves, {spec.name: batches[spec.name]})[k]
                if not loss.requires_grad:
                    continue
                grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
                usage[k] = torch.tensor([g is not None for g in grads])
        return usage

    def _setup(self, batches: Mapping[str, Any]) -> None:
        missing = [n for n in self.names if n not in batches]
        if missing:
            raise ValueError(
                f"step: the first step trains every task, so batches_by_task needs a batch for "
                f"each; missing {missing}"
            )
        usage = self._detect_usage(batches)
        names = [n for n, _ in self._named]
        k = len(self.tasks)
        counts = usage.sum(dim=0)
        if self.shared_param_filter is not None:
            shared = [n for n, p in self._named if self.shared_param_filter(p)]
        else:
            shared = [n for j, n in enumerate(names) if counts[j] >= min(2, k)]
        if not shared:
            raise ValueError(
                "no shared parameter: no parameter is used by two or more tasks (or "
                "shared_param_filter selects none); pass a shared_param_filter"
            )
        for i, spec in enumerate(self.tasks):
            if spec.head_param_filter is not None:
                self._heads[i] = [n for n, p in self._named if spec.head_param_filter(p)]
            else:
                self._heads[i] = [
                    n
                    for j, n in enumerate(names)
                    if usage[i, j] and counts[j] == 1 and n not in shared
                ]
        self._shared_names = shared
        self._shared_set = frozenset(shared)
        self._usage = usage
        self._state = self._tx.init(self._params)

    # ----------------------------------------------------------------------------------------
    # training step

    def _active(self) -> list[int]:
        assert self._state is not None
        row = self._state.groups[int(self._state.ptr)]
        return torch.nonzero(row).flatten().tolist()

    def _check_batches(self, batches_by_task: Any) -> None:
        if not isinstance(batches_by_task, Mapping):
            raise TypeError(
                "batches_by_task must be a dict {task name: batch}, got "
                f"{type(batches_by_task).__name__}"
            )
        unknown = [n for n in batches_by_task if n not in self._index]
        if unknown:
            raise ValueError(
                f"batches_by_task: unknown task names {unknown}; tasks are {self.names}"
            )

    def step(self, batches_by_task: Mapping[str, Any]) -> dict[str, float]:
        """One SON-GOKU step; returns ``{task: loss}`` for the active tasks."""
        self._check_batches(batches_by_task)
        if self._state is None:
            self._setup(batches_by_task)
        state = self._state
        assert state is not None
        k = len(self.tasks)
        active = self._active()
        missing = [self.names[i] for i in active if self.names[i] not in batches_by_task]
        if missing:
            raise ValueError(f"batches_by_task: missing batch for active task(s) {missing}")
        due = (int(state.step) + 1) % self._tx.config["refresh_period"] == 0
        used = {self.names[i]: batches_by_task[self.names[i]] for i in active}
        probe = None
        if due and self.ema_mode == "refresh":
            extra = [
                n
                for n in self.names
                if n in batches_by_task
                and self.tasks[self._index[n]].refresh_batch_provider is None
            ]
            used.update({n: batches_by_task[n] for n in extra})
            probe = torch.zeros(k, dtype=torch.bool, device=state.step.device)
            probe[[self._index[n] for n in extra]] = True
        scale = None
        if self.scaler is not None:
            # a 0-d tensor holding the current scale (also initialises the scaler lazily)
            scale = self.scaler.scale(torch.ones((), device=state.step.device))
        state, grads = self._tx.step(state, self._params, used, probe, loss_scale=scale)
        skipped = bool(state.skipped)
        if self.scaler is None:
            if not skipped:
                self._write_grads(grads, active)
                self.optimizer.step()
        else:
            # p.grad = g · scale, unscaled once by scaler.step; a skipped step writes +inf so
            # that scaler.step skips the optimizer and scaler.update lowers the scale
            self._write_grads(grads, active, scale=scale, poison=skipped)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if not skipped and due:
            state = self._refresh(state, scale)
        self._state = state
        losses = state.losses.tolist()
        out = {self.names[i]: losses[i] for i in active}
        self._log(out)
        return out

    def _write_grads(
        self,
        grads: Mapping[str, Tensor],
        active: list[int],
        *,
        scale: Tensor | None = None,
        poison: bool = False,
    ) -> None:
        assert self._usage is not None
        touched = self._usage[active].any(dim=0).tolist()
        head_of_active = {n for i in active for n in self._heads[i]}
        self.optimizer.zero_grad(set_to_none=True)
        for (name, p), hit in zip(self._named, touched, strict=True):
            if hit or name in head_of_active:
                g = grads[name].detach()
                if poison:
                    g = poison_like(p)
                elif scale is not None:
                    g = g.to(torch.promote_types(g.dtype, torch.float32)) * scale
                p.grad = g.to(p.dtype)
            else:
                p.grad = None

    def _refresh(self, state: SonGokuState, scale: Tensor | None = None) -> SonGokuState:
        providers = {
            spec.name: spec.refresh_batch_provider()
            for spec in self.tasks
            if spec.refresh_batch_provider is not None
        }
        if providers:
            probe = torch.zeros(len(self.tasks), dtype=torch.bool, device=state.step.device)
            probe[[self._index[n] for n in providers]] = True
            state = self._tx.refresh(state, self._params, providers, probe, loss_scale=scale)
        else:
            state = self._tx.refresh(state, self._params)
        self._dump_graph(state)
        return state

    # ----------------------------------------------------------------------------------------
    # accessors

    def _groups(self) -> list[list[int]]:
        if self._state is None:
            return [list(range(len(self.tasks)))]
        m = int(self._state.num_groups)
        return [torch.nonzero(self._state.groups[g]).flatten().tolist() for g in range(m)]

    def schedule_snapshot(self) -> list[list[str]]:
        """The groups in cycle order, as lists of task names."""
        return [[self.names[i] for i in g] for g in self._groups()]

    def current_groups(self) -> list[list[int]]:
        """The groups in cycle order, as lists of task indices."""
        return self._groups()

    @property
    def t(self) -> int:
        """Completed steps."""
        return 0 if self._state is None else int(self._state.step)

    def current_tau(self) -> float:
        """``τ(t)`` of the schedule at the current step count."""
        return float(self.tau_schedule.value(self.t))

    def debug_state(self) -> dict[str, Any]:
        """The reference's ``debug_state()`` keys, plus ``skipped``, ``shared_params``, ``head_params``."""
        groups = self.schedule_snapshot()
        st = self._state
        out: dict[str, Any] = {
            "t": self.t,
            "tau": self.current_tau(),
            "classes": groups,
            "schedule_len": len(groups),
            "step_in_cycle": 0 if st is None else int(st.ptr),
            "refresh_period": self._tx.config["refresh_period"],
            "min_updates_per_cycle": self._tx.config["min_updates_per_cycle"],
            "skipped": False if st is None else bool(st.skipped),
            "shared_params": list(self._shared_names),
            "head_params": {self.names[i]: list(h) for i, h in enumerate(self._heads)},
        }
        if st is not None and int(st.refreshes) > 0:
            adj = st.adjacency.tolist()
            out["last_tau_value"] = float(st.tau)
            out["conflict_graph"] = {
                self.names[i]: sorted(self.names[j] for j in range(len(adj)) if adj[i][j])
                for i in range(len(adj))
            }
            out["interference_matrix"] = st.rho.tolist()
        if st is not None:
            norms = _ema_norms(st.ema, len(self.tasks))
            out["ema_norms"] = {self.names[i]: norms[i] for i in range(len(self.tasks))}
        return out

    @property
    def state(self) -> SonGokuState | None:
        """The functional core's state (None before the first step)."""
        return self._state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the schedule (the optimizer has its own state_dict)."""
        return {
            "version": 1,
            "task_names": list(self.names),
            # copies: the scheduler updates its EMA in place, later steps must not change this
            "core": None if self._state is None else _copy_tree(self._state._asdict()),
            "usage": self._usage,
            "shared_params": list(self._shared_names),
            "head_params": [list(h) for h in self._heads],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the task names must match)."""
        if not isinstance(state_dict, Mapping) or state_dict.get("version") != 1:
            raise ValueError("load_state_dict: not a SonGokuScheduler state_dict (version 1)")
        if list(state_dict["task_names"]) != self.names:
            raise ValueError(
                f"load_state_dict: task names {state_dict['task_names']} do not match {self.names}"
            )
        core = state_dict["core"]
        if core is None:
            self._state = None
            self._usage = None
            return
        self._shared_names = list(state_dict["shared_params"])
        self._shared_set = frozenset(self._shared_names)
        self._heads = [list(h) for h in state_dict["head_params"]]
        self._usage = state_dict["usage"].clone()
        self._state = SonGokuState(**_copy_tree(dict(core)))

    # ----------------------------------------------------------------------------------------
    # optional logs

    def _log(self, losses: dict[str, float]) -> None:
        if self.log_interval is None or self.log_path is None or self.t % self.log_interval:
            return
        record = {
            "t": self.t,
            "losses": losses,
            "classes": self.schedule_snapshot(),
            "tau": self.current_tau(),
        }
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def _dump_graph(self, state: SonGokuState) -> None:
        if self.dump_graph_dir is None:
            return
        os.makedirs(self.dump_graph_dir, exist_ok=True)
        adj = state.adjacency.tolist()
        k = len(adj)
        colors = [0] * k
        for g, members in enumerate(self._groups_of(state)):
            for i in members:
                colors[i] = g
        record = {
            "step": int(state.step),
            "tau": float(state.tau),
            "colors": colors,
            "edges": [[i, j] for i in range(k) for j in range(i + 1, k) if adj[i][j]],
        }
        path = os.path.join(self.dump_graph_dir, f"graph_refresh_{int(state.refreshes):04d}.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(record, fh)

    @staticmethod
    def _groups_of(state: SonGokuState) -> list[list[int]]:
        m = int(state.num_groups)
        return [torch.nonzero(state.groups[g]).flatten().tolist() for g in range(m)]


def _copy_tree(tree: Any) -> Any:
    """Detached copies of every tensor leaf (other leaves as they are)."""
    return optree.tree_map(lambda x: x.detach().clone() if isinstance(x, Tensor) else x, tree)


def _ema_norms(ema: Any, k: int) -> list[float]:
    leaves = [ema] if isinstance(ema, Tensor) else list(ema.values())
    sq = torch.zeros(k, dtype=torch.float64)
    for leaf in leaves:
        sq = sq + leaf.reshape(k, -1).to(torch.float64).pow(2).sum(dim=1).cpu()
    return sq.sqrt().tolist()
