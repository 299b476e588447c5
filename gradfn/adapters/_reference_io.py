"""The SON-GOKU reference implementation's conventions that are not algorithm: its in-group hook on
flattened per-task gradients, its JSONL log and its conflict-graph dumps."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from gradfn.aggregators import Aggregated, Aggregator
from gradfn.algorithms import SonGokuState, group_lists
from gradfn.transforms import EmptyState
from gradfn.tree import weighted_sum
from gradfn.typing import PyTree

__all__ = ["append_jsonl", "dump_graph", "flat_hook_aggregator"]

FlatHook = Callable[[dict[str, Tensor]], Mapping[str, Tensor]]


def flat_hook_aggregator(hook: FlatHook, task_names: list[str]) -> Aggregator:
    """The reference's ``gradient_transform`` (``{task: flat shared grad} -> {task: flat grad}``,
    active tasks only) as an aggregator: its returned vectors are summed, tasks it drops (or
    names it does not know) contribute nothing."""

    def update(
        state: EmptyState,
        grads: PyTree,
        params: PyTree = None,
        *,
        active: Tensor | None = None,
        **extra: Any,
    ) -> tuple[EmptyState, Aggregated]:
        names = list(grads)
        sizes = [grads[n][0].numel() for n in names]
        ref = grads[names[0]]
        k = ref.shape[0]
        idx = list(range(k)) if active is None else torch.nonzero(active).flatten().tolist()
        flat = {task_names[i]: torch.cat([grads[n][i].reshape(-1) for n in names]) for i in idx}
        out = hook(flat)
        if not isinstance(out, Mapping):
            raise TypeError("gradient_transform must return a dict {task name: flat gradient}")
        rows = []
        for i, task in enumerate(task_names):
            vec = out.get(task) if i in idx else None
            rows.append(
                torch.zeros(sum(sizes), dtype=ref.dtype, device=ref.device)
                if vec is None
                else vec.reshape(-1)
            )
        parts = torch.split(torch.stack(rows), sizes, dim=1)
        stacked = {n: p.reshape(grads[n].shape) for n, p in zip(names, parts, strict=True)}
        w = torch.ones(k, dtype=ref.dtype, device=ref.device)
        return state, Aggregated(weighted_sum(stacked, w), w, stacked)

    return Aggregator(lambda tasks, device=None: EmptyState(), update, "reference_hook")


def append_jsonl(path: str, record: dict[str, Any]) -> None:
    """Append one JSON line to ``path`` (the reference's ``log_path`` format)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def dump_graph(directory: str, state: SonGokuState) -> str:
    """Write ``graph_refresh_<n>.json`` (colours, edges, ``τ``) as the reference does; return it."""
    os.makedirs(directory, exist_ok=True)
    adj = state.adjacency.tolist()
    k = len(adj)
    colors = [0] * k
    for g, members in enumerate(group_lists(state)):
        for i in members:
            colors[i] = g
    record = {
        "step": int(state.step),
        "tau": float(state.tau),
        "colors": colors,
        "edges": [[i, j] for i in range(k) for j in range(i + 1, k) if adj[i][j]],
    }
    path = os.path.join(directory, f"graph_refresh_{int(state.refreshes):04d}.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(record, fh)
    return path
