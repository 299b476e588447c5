"""Per-task gradients with per-task batches stacked on a leading task axis:
``vmap(grad(loss))`` (or a loop of ``grad``)."""

from __future__ import annotations

from typing import Any

import optree
import torch
from torch import Tensor

from gradfn.autodiff._call import Tasks, _Call, _Out, _task_list
from gradfn.autodiff._losses import scalar_loss, task_axis
from gradfn.typing import PyTree

__all__ = ["task_batched_grads"]


def task_batched_grads(call: _Call, strategy: str, tasks: Tasks) -> _Out:
    batch, has_aux, selected = call.batch, call.has_aux, call.selected
    k = task_axis(batch)
    if call.num_tasks is not None and k != call.num_tasks:
        raise ValueError(f"`batch` has a task axis of {k} but num_tasks={call.num_tasks}")
    if tasks is not None:
        index = torch.tensor(_task_list(tasks, k), dtype=torch.int64)
        batch = optree.tree_map(lambda x: x.index_select(0, index.to(x.device)), batch)

    def one(sel: PyTree, b: Any) -> tuple[Tensor, Any]:
        out, aux = call.losses(sel, b)
        loss = scalar_loss(out)
        return loss, ((loss, aux) if has_aux else loss)

    def split(out: Any) -> tuple[Any, Any]:
        return out if has_aux else (out, None)

    if strategy == "vmap":
        grads, out = torch.func.vmap(torch.func.grad(one, has_aux=True), in_dims=(None, 0))(
            selected, batch
        )
        losses, aux = split(out)
        return losses, aux, grads, None
    per_task, losses, auxes = [], [], []
    for i in range(task_axis(batch)):
        g, out = torch.func.grad(one, has_aux=True)(
            selected, optree.tree_map(lambda x, i=i: x[i], batch)
        )
        loss, aux = split(out)
        per_task.append(g)
        losses.append(loss)
        auxes.append(aux)
    grads = optree.tree_map(lambda *xs: torch.stack(xs), per_task[0], *per_task[1:])
    aux = optree.tree_map(lambda *xs: torch.stack(xs), auxes[0], *auxes[1:]) if has_aux else None
    return torch.stack(losses), aux, grads, None
