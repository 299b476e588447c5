"""The per-task gradient engine: ``J = ∂L/∂θ`` (``K × n``) as a task-stacked pytree.

Two input forms:

* **Shared forward**: ``loss_fn(params, batch)`` returns the ``K`` task losses from one forward
  pass, as a ``dict[str, Tensor]`` of scalars, a tuple / list of scalars or a 1-D tensor ``(K,)``.
* **Per-task batches** (``task_batched=True``): ``loss_fn(params, batch_k)`` returns one scalar,
  and every leaf of ``batch`` is stacked on a leading task axis ``K``: ``vmap(grad(loss))``.

Strategies (all give the same numbers):

* ``"vmap"``: one forward, then the VJP of the loss vector vmapped over the one-hot cotangents:
  one batched backward. Under ``torch.compile`` it is ``vmap(vjp_fn)(eye)`` with
  ``torch.func.vjp``; eagerly the same vmap runs over autograd's graph
  (``torch.autograd.grad(..., is_grads_batched=True)``), which also lets the forward update
  BatchNorm running statistics in place (``torch.func`` transforms forbid that mutation).
* ``"loop"``: one forward with autograd, then one ``torch.autograd.grad`` per task on the retained
  graph (freed by the last), each task's row copied into the preallocated ``(R, *shape)`` output
  as soon as it is computed (per-task batches: one forward and backward per task).
* ``"auto"``: ``"vmap"`` while compiling (a loop of ``autograd.grad`` calls cannot be traced) and on
  accelerators; ``"loop"`` on the CPU, where ``benchmarks/per_task_grads.py`` measured the batched
  backward 0–80 % slower.

Return the losses as a dict or a list rather than as their stack: a task's backward then starts at
its own loss and visits only the part of the graph it uses.

``tasks`` differentiates a subset of the tasks (the losses of all ``K`` are still returned), and
``return_usage`` reports which parameters each task's loss reaches: autograd already knows (an
unreached parameter gets ``None``), so no extra pass is spent on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optree
import torch
from torch import Tensor

from gradfn._internal.checks import check_choice
from gradfn._internal.compat import is_compiling
from gradfn.autodiff._call import (
    STRATEGIES,
    Predicate,
    Tasks,
    _Call,
    _forward,
    _Out,
    _select,
    _task_list,
    _usage_of,
    choose_strategy,
)
from gradfn.autodiff._losses import loss_list, stack_losses
from gradfn.autodiff._task_batched import task_batched_grads
from gradfn.typing import LossFn, PyTree, Strategy

__all__ = [
    "STRATEGIES",
    "Predicate",
    "choose_strategy",
    "per_task_grads",
    "per_task_impl",
    "value_and_per_task_grads",
]

# --------------------------------------------------------------------------------------------
# shared forward: loop / vmap / torch.func


_ZEROED_NUMEL = 1 << 16  # outputs up to this many elements are allocated as zeros


def _loop_grads(call: _Call, tasks: Tasks, workspace: PyTree = None) -> _Out:
    with torch.enable_grad():
        leaves, spec, losses, aux = _forward(call)
        chosen = _task_list(tasks, len(losses))
        last = max((pos for pos, i in enumerate(chosen) if losses[i].requires_grad), default=-1)
        # each leaf's (R, *shape) output is allocated once and row r is copied in as soon as task
        # r's backward returns, so the per-task gradients are freed (and their memory reused) at
        # once instead of all K living until a torch.stack copies them a second time. Small
        # outputs start as zeros; large ones are left uninitialised and only the rows of tasks
        # that do not reach the leaf are zeroed afterwards.
        r = len(chosen)
        zeroed = [x.numel() * r <= _ZEROED_NUMEL for x in leaves]
        if workspace is None:
            out = [
                (torch.zeros if z else torch.empty)((r, *x.shape), dtype=x.dtype, device=x.device)
                for x, z in zip(leaves, zeroed, strict=True)
            ]
        else:
            out = [buf[:r] for buf in _check_workspace(workspace, spec, leaves, r)]
            for o, z in zip(out, zeroed, strict=True):
                if z:
                    o.zero_()
        used: list[list[bool]] = []
        sparse: dict[int, dict[int, Tensor]] = {}  # sparse gradients (e.g. sparse embeddings)
        for pos, i in enumerate(chosen):
            # each task's own loss (not an element of their stack): its backward visits only the
            # part of the graph that the task uses
            row: Sequence[Tensor | None] = (None,) * len(leaves)
            if losses[i].requires_grad:
                row = torch.autograd.grad(
                    losses[i], leaves, retain_graph=pos < last, allow_unused=True
                )
            grads = [(j, g) for j, g in enumerate(row) if g is not None]
            dense = [(j, g) for j, g in grads if g.layout == torch.strided]
            if len(dense) != len(grads):  # sparse gradients (e.g. a sparse embedding)
                for j, g in grads:
                    if g.layout != torch.strided:
                        sparse.setdefault(j, {})[pos] = g
            if dense:
                torch._foreach_copy_([out[j][pos] for j, _ in dense], [g for _, g in dense])
            used.append([g is not None for g in row])
            del row, grads, dense
        for j, rows in sparse.items():  # stacked as they are when every task has one
            if len(rows) == r:
                out[j] = torch.stack([rows[pos] for pos in range(r)])
            else:
                for pos, g in rows.items():
                    out[j][pos].copy_(g.to_dense())
        for j, o in enumerate(out):  # rows of tasks that do not reach leaf j are zeros
            if zeroed[j] or (j in sparse and len(sparse[j]) == r):
                continue
            missing = [pos for pos, hit in enumerate(used) if not hit[j]]
            if len(missing) == r:
                o.zero_()
            elif len(missing) == 1:
                o[missing[0]].zero_()
            elif missing:
                o.index_fill_(0, torch.tensor(missing, device=o.device), 0)
        stacked_losses = stack_losses(losses)
    usage = torch.tensor(used, dtype=torch.bool).reshape(len(chosen), len(leaves))
    return stacked_losses.detach(), aux, optree.tree_unflatten(spec, out), usage


def _check_workspace(workspace: PyTree, spec: Any, leaves: list[Tensor], r: int) -> list[Tensor]:
    """The workspace's leaves, checked: ``(≥ R, *shape)`` buffers like the differentiated leaves."""
    bufs, ws_spec = optree.tree_flatten(workspace)
    if ws_spec != spec:
        raise ValueError("`workspace` must have the structure of the differentiated parameters")
    for buf, x in zip(bufs, leaves, strict=True):
        if not isinstance(buf, Tensor) or buf.shape[1:] != x.shape or buf.shape[0] < r:
            got = tuple(buf.shape) if isinstance(buf, Tensor) else type(buf).__name__
            raise ValueError(
                f"`workspace`: a buffer of shape (>= {r}, *{tuple(x.shape)}), got {got}"
            )
        if buf.dtype != x.dtype or buf.device != x.device:
            raise ValueError(
                f"`workspace`: buffers must match the parameters' dtype and device, got "
                f"{buf.dtype} on {buf.device} for {x.dtype} on {x.device}"
            )
    return bufs


def _vmap_grads(call: _Call, tasks: Tasks, want_usage: bool) -> _Out:
    if is_compiling():
        return _func_vjp_grads(call, tasks)
    # eager: the one-hot cotangents vmapped over autograd's backward graph (is_grads_batched);
    # unlike torch.func.vjp this lets the forward mutate buffers in place (BatchNorm statistics)
    with torch.enable_grad():
        leaves, spec, losses, aux = _forward(call)
        chosen = _task_list(tasks, len(losses))
        r = len(chosen)
        picked = [losses[i] for i in chosen]
        outputs = [loss for loss in picked if loss.requires_grad]
        if outputs:
            eye = torch.eye(r, dtype=picked[0].dtype, device=picked[0].device)
            cotangents = [
                eye[:, pos].to(x.dtype) for pos, x in enumerate(picked) if x.requires_grad
            ]
            grads: Sequence[Tensor | None] = torch.autograd.grad(
                outputs, leaves, grad_outputs=cotangents, is_grads_batched=True, allow_unused=True
            )
        else:
            grads = (None,) * len(leaves)
        usage = _usage_of(picked, leaves) if want_usage else None
        stacked_losses = stack_losses(losses)
    stacked = [
        torch.zeros((r, *x.shape), dtype=x.dtype, device=x.device) if g is None else g
        for g, x in zip(grads, leaves, strict=True)
    ]
    return stacked_losses.detach(), aux, optree.tree_unflatten(spec, stacked), usage


def _func_vjp_grads(call: _Call, tasks: Tasks) -> _Out:
    def losses_of(sel: PyTree) -> Any:
        out, aux = call.losses(sel)
        losses = stack_losses(loss_list(out, call.num_tasks))
        return (losses, aux) if call.has_aux else losses

    out: Any = torch.func.vjp(losses_of, call.selected, has_aux=call.has_aux)
    losses, vjp_fn, aux = out if call.has_aux else (*out, None)
    eye = torch.eye(losses.shape[0], dtype=losses.dtype, device=losses.device)
    if tasks is not None:
        eye = eye[_task_list(tasks, losses.shape[0])]
    (grads,) = torch.func.vmap(vjp_fn)(eye)
    return losses, aux, grads, None


# --------------------------------------------------------------------------------------------
# public API


def _usage_tree(spec: Any, usage: Tensor | None) -> PyTree:
    """``(R, P)`` usage as a pytree of ``(R,)`` bool tensors with the parameters' structure."""
    if usage is None:
        return None
    return optree.tree_unflatten(spec, list(usage.T.unbind(0)))


def value_and_per_task_grads(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    *,
    wrt: Predicate | None = None,
    strategy: Strategy = "auto",
    task_batched: bool = False,
    has_aux: bool = False,
    num_tasks: int | None = None,
    tasks: Tasks = None,
    return_usage: bool = False,
    workspace: PyTree = None,
) -> Any:
    """Task losses and task-stacked gradients ``J`` of ``loss_fn`` at ``params``.

    Args:
        loss_fn: ``loss_fn(params, batch)`` → ``K`` scalar losses (dict / tuple / list /
            1-D tensor), or one scalar per task batch when ``task_batched``. With ``has_aux``
            it returns ``(losses, aux)``.
        params: a pytree of tensors, usually ``dict[str, Tensor]`` of dotted parameter names.
        batch: anything ``loss_fn`` takes; with ``task_batched`` its tensors carry a leading ``K``.
        wrt: a predicate on dotted names; only the selected parameters are differentiated (the
            others are held constant and left out of the output).
        strategy: ``"vmap"``, ``"loop"`` or ``"auto"`` (module docstring).
        task_batched: ``vmap(grad(loss))`` over per-task batches.
        has_aux: ``loss_fn`` returns ``(losses, aux)``; ``aux`` is returned beside the losses.
        num_tasks: when given, the number of tasks ``K`` is checked against it.
        tasks: differentiate only these task indices (``R`` of them, in this order); the
            gradients then have ``R`` rows while the losses of all ``K`` tasks are returned
            (they come from the one shared forward). With ``task_batched`` only the ``R``
            tasks' batches are evaluated, and their ``R`` losses are returned.
        return_usage: also return which parameters each differentiated task reaches: a pytree
            with the structure of the differentiated parameters and ``(R,)`` bool leaves (CPU),
            read from the autograd graph. ``None`` while compiling or with ``task_batched``.
        workspace: buffers the ``"loop"`` strategy writes the rows into instead of allocating
            them (a pytree like the differentiated parameters with ``(≥ R, *shape)`` leaves of
            their dtype and device); the returned gradients are then views of it, overwritten by
            the next call that uses it. On the CPU this spares the first touch of fresh memory
            at every call. The other strategies allocate.

    Returns:
        ``(losses, grads)`` with ``losses`` of shape ``(K,)`` (detached) and ``grads``
        task-stacked: ``grads[name].shape == (R, *params[name].shape)`` (``R = K`` by default).
        With ``has_aux`` the first element is ``(losses, aux)``; with ``return_usage`` a third
        element, the usage.
    """
    losses, aux, grads, usage = per_task_impl(
        loss_fn,
        params,
        batch,
        wrt,
        strategy,
        task_batched,
        has_aux,
        num_tasks,
        tasks,
        return_usage,
        workspace=workspace,
    )
    value = (losses, aux) if has_aux else losses
    if return_usage:
        return value, grads, _usage_tree(optree.tree_structure(_select(params, wrt)[0]), usage)
    return value, grads


def per_task_impl(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    wrt: Predicate | None,
    strategy: Strategy,
    task_batched: bool,
    has_aux: bool,
    num_tasks: int | None,
    tasks: Tasks,
    want_usage: bool,
    *,
    workspace: PyTree = None,
) -> tuple[Tensor, Any, PyTree, Tensor | None]:
    """``(losses, aux, grads, usage (R, P) bool or None)``: the body of
    :func:`value_and_per_task_grads`."""
    check_choice("strategy", strategy, STRATEGIES)
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}")
    selected, rest = _select(params, wrt)
    if strategy == "auto":
        strategy = choose_strategy(selected)  # type: ignore[assignment]
    call = _Call(loss_fn, selected, rest, batch, has_aux, num_tasks)
    if task_batched:
        out = task_batched_grads(call, strategy, tasks)
    elif strategy == "vmap":
        out = _vmap_grads(call, tasks, want_usage)
    else:
        out = _loop_grads(call, tasks, workspace)
    losses, aux, grads, usage = out
    return losses.detach(), aux, grads, usage


def per_task_grads(loss_fn: LossFn, params: PyTree, batch: Any, **options: Any) -> PyTree:
    """Task-stacked gradients of ``loss_fn``; ``options`` as :func:`value_and_per_task_grads`."""
    if options.get("return_usage"):
        raise TypeError("per_task_grads returns the gradients only; use value_and_per_task_grads")
    return value_and_per_task_grads(loss_fn, params, batch, **options)[1]
