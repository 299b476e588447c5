"""The reference implementations' conventions that are not algorithm: SON-GOKU's in-group hook on
flattened per-task gradients, its JSONL log and conflict-graph dumps; GradientConductor's model and
loss call conventions and its BatchNorm freezing."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gradfn.aggregators import Aggregated, Aggregator
from gradfn.algorithms import SonGokuState, group_lists
from gradfn.transforms import EmptyState
from gradfn.tree import weighted_sum
from gradfn.typing import PyTree

__all__ = [
    "append_jsonl",
    "dump_graph",
    "eval_mode",
    "flat_hook_aggregator",
    "micro_batch_losses",
    "running_stats_mode",
]

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


def _call_model(model: nn.Module, x: Any) -> Any:
    if isinstance(x, Mapping) and ("args" in x or "kwargs" in x):
        return model(*x.get("args", ()), **x.get("kwargs", {}))
    return model(*x) if isinstance(x, (tuple, list)) else model(x)


def _call_loss(loss_fn: Callable[..., Tensor], out: Any, y: Any) -> Tensor:
    if isinstance(y, Mapping) and ("args" in y or "kwargs" in y):
        return loss_fn(out, *y.get("args", ()), **y.get("kwargs", {}))
    return loss_fn(out, y)


@contextlib.contextmanager
def eval_mode(module: nn.Module, whole_model: bool) -> Iterator[None]:
    """BatchNorm layers (or, ``whole_model``, every module) in eval mode; modes restored after."""
    bn = nn.modules.batchnorm._BatchNorm
    targets = [m for m in module.modules() if whole_model or isinstance(m, bn)]
    modes = [m.training for m in targets]
    try:
        for m in targets:
            m.training = False
        yield
    finally:
        for m, mode in zip(targets, modes, strict=True):
            m.training = mode


def _update_running_stats(module: nn.modules.batchnorm._BatchNorm, args: tuple[Any, ...]) -> None:
    """What a train-mode BatchNorm does to its running statistics, from this input, without
    normalising with the batch statistics."""
    x = args[0]
    mean_buf, var_buf, count = module.running_mean, module.running_var, module.num_batches_tracked
    if mean_buf is None or var_buf is None or count is None:
        return
    with torch.no_grad():
        dims = [0, *range(2, x.dim())]
        xf = x.detach().float()
        n = xf.numel() // xf.shape[1]
        mean = xf.mean(dims)
        var = xf.var(dims, unbiased=n > 1)
        count.add_(1)
        momentum = module.momentum
        if momentum is None:  # cumulative moving average
            momentum = 1.0 / float(count)
        mean_buf.lerp_(mean.to(mean_buf.dtype), momentum)
        var_buf.lerp_(var.to(var_buf.dtype), momentum)


@contextlib.contextmanager
def running_stats_mode(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with their running statistics (eval mode) while each forward
    updates those statistics from its input as train mode would: once per forward, no extra
    pass. The layers that were in train mode only; modes restored and hooks removed after."""
    bn = nn.modules.batchnorm._BatchNorm
    targets = [
        m for m in module.modules() if isinstance(m, bn) and m.training and m.track_running_stats
    ]
    hooks = [m.register_forward_pre_hook(_update_running_stats) for m in targets]
    try:
        for m in targets:
            m.training = False
        yield
    finally:
        for h in hooks:
            h.remove()
        for m in targets:
            m.training = True


def micro_batch_losses(
    loss_fns: Mapping[str, Callable[..., Tensor]],
    names: list[str],
    autocast_dtype: torch.dtype | None,
    reference: bool,
    module: nn.Module,
    batch: Any,
) -> list[Tensor]:
    """GradientConductor's ``K`` losses of one micro-batch ``(x, y)``: one forward shared by every
    loss (under ``torch.autocast`` when asked; the reference autocasts on CUDA only).

    The reference's call conventions: if ``x`` is a dict with ``'args'`` / ``'kwargs'``:
    ``model(*x['args'], **x['kwargs'])``; a tuple / list: ``model(*x)``; else ``model(x)``. If
    ``y`` is such a dict: ``loss_fn(out, *y['args'], **y['kwargs'])``; else ``loss_fn(out, y)``.
    """
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError("data_provider() must return a pair (x, y)")
    x, y = batch
    device = next(module.parameters()).device
    use_autocast = autocast_dtype is not None and (device.type == "cuda" or not reference)
    ctx = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if use_autocast
        else contextlib.nullcontext()
    )
    with ctx:
        out = _call_model(module, x)
        losses = [_call_loss(loss_fns[k], out, y) for k in names]
    for k, loss in zip(names, losses, strict=True):
        if isinstance(loss, Tensor) and loss.dim() != 0:
            raise ValueError(
                f"loss_fns[{k!r}] must return a scalar, got shape {tuple(loss.shape)} "
                "(reduce it, e.g. with .mean())"
            )
    return losses
