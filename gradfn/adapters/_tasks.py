"""SON-GOKU's task specs (the reference implementation's ``TaskSpec``) and the ``K``-loss function
an adapter hands to the core."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradfn.adapters._shared_forward import shared_forward

__all__ = [
    "TaskSpec",
    "check_batches",
    "check_tasks",
    "heads_of",
    "shared_and_heads",
    "task_losses",
]


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


def check_tasks(tasks: Any) -> list[TaskSpec]:
    """A non-empty list of :class:`TaskSpec` with unique names and callables (checked)."""
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


def check_batches(batches: Any, names: list[str]) -> None:
    """``batches`` must be a dict ``{task name: batch}`` naming only known tasks."""
    if not isinstance(batches, Mapping):
        raise TypeError(
            f"batches_by_task must be a dict {{task name: batch}}, got {type(batches).__name__}"
        )
    unknown = [n for n in batches if n not in names]
    if unknown:
        raise ValueError(f"batches_by_task: unknown task names {unknown}; tasks are {names}")


def task_losses(
    tasks: list[TaskSpec],
    autocast_dtype: torch.dtype | None,
    device_type: str,
    *,
    share_forward: bool = True,
) -> Callable[[nn.Module, Mapping[str, Any]], list[Tensor]]:
    """``losses(module, batches) -> [L_1, ..., L_K]``: each task's loss on its own batch; tasks
    without a batch are a constant 0 (their forward is not run).

    A list, not a stack: each task's backward then visits only its own part of the graph.
    ``share_forward``: tasks that call the model (or a direct submodule) on the same input objects
    share one forward (:func:`~gradfn.adapters._shared_forward.shared_forward`).
    """

    def losses(module: nn.Module, batches: Mapping[str, Any]) -> list[Tensor]:
        if share_forward and len(batches) > 1:
            with shared_forward(module):
                return evaluate(module, batches)
        return evaluate(module, batches)

    def evaluate(module: nn.Module, batches: Mapping[str, Any]) -> list[Tensor]:
        out: list[Tensor | None] = []
        for spec in tasks:
            if spec.name not in batches:
                out.append(None)
                continue
            if autocast_dtype is None:
                loss = spec.loss_fn(module, batches[spec.name])
            else:
                with torch.autocast(device_type, dtype=autocast_dtype):
                    loss = spec.loss_fn(module, batches[spec.name])
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                got = type(loss).__name__ if not isinstance(loss, Tensor) else tuple(loss.shape)
                raise TypeError(
                    f"task {spec.name!r}: loss_fn must return a scalar Tensor, got {got}"
                )
            loss = loss.reshape(())
            out.append(loss.float() if autocast_dtype is not None else loss)
        ref = next((x for x in out if x is not None), None)
        if ref is None:  # no task runs (every active task quarantined): nothing to differentiate
            ref = next(module.parameters())
        zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
        return [zero if x is None else x for x in out]

    return losses


def shared_and_heads(
    named: list[tuple[str, nn.Parameter]],
    usage: Tensor,
    tasks: list[TaskSpec],
    shared_filter: Callable[[nn.Parameter], bool] | None,
) -> tuple[list[str], list[list[str]]]:
    """``(shared, heads)`` from ``usage`` (K × P bool: task ``k`` reaches parameter ``p``):
    shared parameters are those ``shared_filter`` selects, or else those two or more tasks reach;
    task ``k``'s head is what its ``head_param_filter`` selects, or else the parameters only it
    reaches. A task whose row is empty (its loss was a constant, e.g. no labels in the batch)
    does not count: its reach is learned at its first non-constant step (:func:`heads_of`)."""
    names = [n for n, _ in named]
    known = int(usage.any(dim=1).sum())
    counts = usage.sum(dim=0)
    if shared_filter is not None:
        shared = [n for n, p in named if shared_filter(p)]
    else:
        shared = [n for j, n in enumerate(names) if counts[j] >= min(2, len(tasks))]
    if not shared:
        blind = [t.name for t, row in zip(tasks, usage.tolist(), strict=True) if not any(row)]
        hint = (
            f"; tasks {blind} reached no parameter at the first step (a constant loss, e.g. no "
            "labels in its batch)"
            if blind and known < len(tasks)
            else ""
        )
        raise ValueError(
            "no shared parameter: no parameter is used by two or more tasks (or "
            f"shared_param_filter selects none){hint}; pass a shared_param_filter"
        )
    return shared, heads_of(named, usage, tasks, shared)


def heads_of(
    named: list[tuple[str, nn.Parameter]],
    usage: Tensor,
    tasks: list[TaskSpec],
    shared: list[str],
) -> list[list[str]]:
    """Each task's head: its ``head_param_filter``'s parameters, or else the non-shared
    parameters only it reaches (``usage``: K × P bool)."""
    names = [n for n, _ in named]
    counts = usage.sum(dim=0)
    shared_set = set(shared)
    return [
        [n for n, p in named if spec.head_param_filter(p)]
        if spec.head_param_filter is not None
        else [
            n for j, n in enumerate(names) if usage[i, j] and counts[j] == 1 and n not in shared_set
        ]
        for i, spec in enumerate(tasks)
    ]
