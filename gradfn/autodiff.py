"""The per-task gradient engine (DESIGN.md layer 2).

Two input forms:

* **Shared forward** (form A): ``loss_fn(params, batch)`` returns the ``K`` task losses from one
  forward pass, as a ``dict[str, Tensor]`` of scalars, a tuple / list of scalars or a 1-D tensor
  ``(K,)``. The per-task gradients are ``J = ∂L/∂θ`` (``K × n``), computed from that one forward.
* **Per-task batches** (form B, ``task_batched=True``): ``loss_fn(params, batch_k)`` returns one
  scalar, and every leaf of ``batch`` is stacked on a leading task axis ``K``: the design card's
  ``vmap(grad(loss))``.

Strategies (all give the same numbers):

* ``"vmap"``: one forward, then the VJP of the loss vector vmapped over the ``K`` one-hot
  cotangents: one ``K``-wide batched backward. Under ``torch.compile`` it is
  ``vmap(vjp_fn)(eye(K))`` with ``torch.func.vjp``; eagerly the same vmap runs over autograd's graph
  (``torch.autograd.grad(..., is_grads_batched=True)``), which also lets the forward update
  BatchNorm running statistics in place (``torch.func`` transforms forbid that mutation).
* ``"loop"``: one forward with autograd, then ``K`` calls of ``torch.autograd.grad`` on the retained
  graph (form B: ``K`` forward + backward passes, one per task batch).
* ``"auto"``: ``"vmap"`` while compiling (the loop of ``autograd.grad`` calls cannot be traced)
  and on accelerators (where batching ``K`` small kernels into one is the usual win; not measured
  in this repository's CPU benchmark); ``"loop"`` on the CPU. The rule is measured by ``benchmarks/per_task_grads.py``: on a 2-core CPU the ``K``
  separate backward passes are already compute-bound, and vmap's batched kernels (and the copies
  of the cotangents into them) made it 0–40 % slower on every model there (MLP and CNN,
  ``K`` = 2…16).

Return the losses as a dict or a list rather than as their stack: a task's backward then starts at
its own loss and visits only the part of the graph it uses (a stacked 1-D tensor makes every
backward pass through all ``K`` heads, with zero cotangents on the others).

The output is *task-stacked*: ``grads[name].shape == (K, *params[name].shape)``, in each
parameter's dtype; parameters a task does not use get zeros.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import optree
import torch
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module

from gradfn._compat import is_compiling as _is_compiling
from gradfn.tree import partition

PyTree = Any
Params = Mapping[str, Tensor]
LossFn = Callable[[Params, Any], Any]
Strategy = Literal["auto", "vmap", "loop"]

__all__ = [
    "accumulate_per_task_grads",
    "choose_strategy",
    "functional_loss",
    "per_task_grads",
    "split_module",
    "value_and_per_task_grads",
    "value_and_weighted_grad",
]

_STRATEGIES = ("auto", "vmap", "loop")


# --------------------------------------------------------------------------------------------
# input handling


def _loss_list(out: Any, num_tasks: int | None) -> list[Tensor]:
    """The task losses returned by ``loss_fn`` as a list of ``K`` 0-d tensors (checked)."""
    if isinstance(out, Tensor):
        if out.dim() != 1:
            raise ValueError(
                "loss_fn must return K scalar losses (a dict, a tuple/list or a 1-D tensor); "
                f"got a tensor of shape {tuple(out.shape)}"
            )
        losses = list(out.unbind(0))
    elif isinstance(out, Mapping):
        losses = list(out.values())
    elif isinstance(out, (tuple, list)):
        losses = list(out)
    else:
        raise TypeError(
            "loss_fn must return a dict of scalar tensors, a tuple/list of scalar tensors or a 1-D "
            f"tensor; got {type(out).__name__}"
        )
    if len(losses) == 0:
        raise ValueError("loss_fn returned an empty set of task losses (K = 0)")
    for i, loss in enumerate(losses):
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss_fn: task loss {i} is a {type(loss).__name__}, not a Tensor")
        if loss.numel() != 1 or loss.dim() > 1:
            raise ValueError(
                f"loss_fn: task loss {i} must be a scalar, got shape {tuple(loss.shape)} "
                "(reduce it, e.g. with .mean())"
            )
    if num_tasks is not None and len(losses) != num_tasks:
        raise ValueError(f"loss_fn returned {len(losses)} task losses but num_tasks={num_tasks}")
    return [loss.reshape(()) for loss in losses]


def _stack_losses(losses: list[Tensor]) -> Tensor:
    """``(K,)`` tensor of the losses, in their promoted dtype."""
    dtype = losses[0].dtype
    for loss in losses[1:]:
        dtype = torch.promote_types(dtype, loss.dtype)
    return torch.stack([loss.to(dtype) for loss in losses])


def _loss_vector(out: Any, num_tasks: int | None) -> Tensor:
    return _stack_losses(_loss_list(out, num_tasks))


def _select(params: PyTree, wrt: Callable[[str], bool] | None) -> tuple[PyTree, dict[str, Tensor]]:
    """Split ``params`` into the differentiated part and the part held constant."""
    if wrt is None:
        if isinstance(params, Mapping) and len(params) == 0:
            raise ValueError("params is empty: there is nothing to differentiate")
        return params, {}
    if not isinstance(params, Mapping):
        raise TypeError("`wrt` needs `params` to be a mapping of dotted names to tensors")
    if not callable(wrt):
        raise TypeError(f"`wrt` must be a predicate on parameter names, got {type(wrt).__name__}")
    selected, rest = partition(params, wrt)
    if not selected:
        raise ValueError(
            f"`wrt` selects no parameter (names available: {sorted(params)[:8]}"
            f"{'...' if len(params) > 8 else ''})"
        )
    return selected, rest


def _merge(selected: PyTree, rest: dict[str, Tensor]) -> PyTree:
    if not rest:
        return selected
    return {**rest, **selected}


def _check_strategy(strategy: str) -> None:
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")


def choose_strategy(params: PyTree) -> str:
    """The strategy ``"auto"`` picks for these (selected) parameters; see the module docstring."""
    leaves = optree.tree_leaves(params)
    if _is_compiling() or not leaves or leaves[0].device.type != "cpu":
        return "vmap"
    return "loop"


def _zeros_for_none(grads: tuple[Tensor | None, ...], leaves: list[Tensor]) -> list[Tensor]:
    """Gradients of unused inputs (``None`` from autograd) as zeros."""
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves, strict=True)]


def _stack_rows(rows: list[Tensor | None], like: Tensor) -> Tensor:
    """Stack one leaf's per-task gradients on a task axis; ``None`` (unused) rows are zeros."""
    present = [g for g in rows if g is not None]
    if len(present) == len(rows):
        return torch.stack(present)
    out = torch.zeros((len(rows), *like.shape), dtype=like.dtype, device=like.device)
    for i, g in enumerate(rows):
        if g is not None:
            out[i] = g
    return out


def _split_aux(out: Any, has_aux: bool) -> tuple[Any, Any]:
    if not has_aux:
        return out, None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError("has_aux=True needs loss_fn to return a pair (losses, aux)")
    return out


# --------------------------------------------------------------------------------------------
# form A: one shared forward


def _vmap_grads(loss_fn, selected, rest, batch, has_aux, num_tasks):
    if _is_compiling():
        return _func_vjp_grads(loss_fn, selected, rest, batch, has_aux, num_tasks)
    # Eager: the same one-hot cotangents, vmapped over autograd's backward graph
    # (``is_grads_batched``). Unlike ``torch.func.vjp`` this lets the forward mutate buffers
    # in place (BatchNorm running statistics in train mode).
    flat, spec = optree.tree_flatten(selected)
    leaves = [x.detach().requires_grad_(True) for x in flat]
    with torch.enable_grad():
        out, aux = _split_aux(
            loss_fn(_merge(optree.tree_unflatten(spec, leaves), rest), batch), has_aux
        )
        loss_list = _loss_list(out, num_tasks)
        k = len(loss_list)
        # One output per task (not their stack): a task's backward then starts at its own loss.
        outputs = [loss for loss in loss_list if loss.requires_grad]
        if outputs:
            eye = torch.eye(k, dtype=loss_list[0].dtype, device=loss_list[0].device)
            cotangents = [
                eye[:, i].to(loss.dtype) for i, loss in enumerate(loss_list) if loss.requires_grad
            ]
            grads = torch.autograd.grad(
                outputs, leaves, grad_outputs=cotangents, is_grads_batched=True, allow_unused=True
            )
        else:
            grads = (None,) * len(leaves)
        losses = _stack_losses(loss_list)
    stacked = [
        torch.zeros((k, *x.shape), dtype=x.dtype, device=x.device) if g is None else g
        for g, x in zip(grads, leaves, strict=True)
    ]
    return losses.detach(), aux, optree.tree_unflatten(spec, stacked)


def _func_vjp_grads(loss_fn, selected, rest, batch, has_aux, num_tasks):
    def losses_of(sel):
        out, aux = _split_aux(loss_fn(_merge(sel, rest), batch), has_aux)
        losses = _loss_vector(out, num_tasks)
        return (losses, aux) if has_aux else losses

    if has_aux:
        losses, vjp_fn, aux = torch.func.vjp(losses_of, selected, has_aux=True)
    else:
        (losses, vjp_fn), aux = torch.func.vjp(losses_of, selected), None
    eye = torch.eye(losses.shape[0], dtype=losses.dtype, device=losses.device)
    (grads,) = torch.func.vmap(vjp_fn)(eye)
    return losses, aux, grads


def _loop_grads(loss_fn, selected, rest, batch, has_aux, num_tasks):
    flat, spec = optree.tree_flatten(selected)
    leaves = [x.detach().requires_grad_(True) for x in flat]
    with torch.enable_grad():
        out, aux = _split_aux(
            loss_fn(_merge(optree.tree_unflatten(spec, leaves), rest), batch), has_aux
        )
        loss_list = _loss_list(out, num_tasks)
        last = max((i for i, loss in enumerate(loss_list) if loss.requires_grad), default=-1)
        rows: list[tuple[Tensor | None, ...]] = []
        for i, loss in enumerate(loss_list):
            # Differentiate each task's own loss (not an element of their stack), so its backward
            # visits only the part of the graph that the task uses.
            if loss.requires_grad:
                g = torch.autograd.grad(loss, leaves, retain_graph=i < last, allow_unused=True)
            else:
                g = (None,) * len(leaves)
            rows.append(g)
        losses = _stack_losses(loss_list)
    stacked = [_stack_rows([row[j] for row in rows], x) for j, x in enumerate(leaves)]
    return losses.detach(), aux, optree.tree_unflatten(spec, stacked)


# --------------------------------------------------------------------------------------------
# form B: per-task batches stacked on a leading axis


def _task_axis(batch: Any) -> int:
    leaves = optree.tree_leaves(batch)
    if not leaves:
        raise ValueError("task_batched=True needs `batch` to hold tensors stacked on a task axis")
    sizes = {x.shape[0] if isinstance(x, Tensor) and x.dim() > 0 else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "task_batched=True: every tensor of `batch` needs the same leading task axis K; got "
            f"leading sizes {sorted(str(s) for s in sizes)}"
        )
    k = sizes.pop()
    if k == 0:
        raise ValueError("task_batched=True: `batch` has an empty task axis (K = 0)")
    return int(k)


def _scalar_loss(out: Any) -> Tensor:
    if not isinstance(out, Tensor) or out.numel() != 1:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"task_batched=True: loss_fn must return one scalar loss, got {shape}")
    return out.reshape(())


def _task_batched_grads(loss_fn, selected, rest, batch, has_aux, strategy, num_tasks):
    k = _task_axis(batch)
    if num_tasks is not None and k != num_tasks:
        raise ValueError(f"`batch` has a task axis of {k} but num_tasks={num_tasks}")

    def one(sel, b):
        out, aux = _split_aux(loss_fn(_merge(sel, rest), b), has_aux)
        loss = _scalar_loss(out)
        return loss, ((loss, aux) if has_aux else loss)

    def split(out):
        return out if has_aux else (out, None)

    if strategy == "vmap":
        grads, out = torch.func.vmap(torch.func.grad(one, has_aux=True), in_dims=(None, 0))(
            selected, batch
        )
        losses, aux = split(out)
        return losses, aux, grads
    per_task = []
    losses, auxes = [], []
    for i in range(k):
        b = optree.tree_map(lambda x, i=i: x[i], batch)
        g, out = torch.func.grad(one, has_aux=True)(selected, b)
        loss, aux = split(out)
        per_task.append(g)
        losses.append(loss)
        auxes.append(aux)
    grads = optree.tree_map(lambda *xs: torch.stack(xs), per_task[0], *per_task[1:])
    aux = optree.tree_map(lambda *xs: torch.stack(xs), auxes[0], *auxes[1:]) if has_aux else None
    return torch.stack(losses), aux, grads


# --------------------------------------------------------------------------------------------
# public API


def value_and_per_task_grads(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    *,
    wrt: Callable[[str], bool] | None = None,
    strategy: Strategy = "auto",
    task_batched: bool = False,
    has_aux: bool = False,
    num_tasks: int | None = None,
) -> tuple[Any, PyTree]:
    """Task losses and task-stacked gradients ``J`` (``K`` rows) of ``loss_fn`` at ``params``.

    Args:
        loss_fn: ``loss_fn(params, batch)`` → ``K`` scalar losses (dict / tuple / list /
            1-D tensor), or one scalar per task batch when ``task_batched``. With ``has_aux``
            it returns ``(losses, aux)``.
        params: a pytree of tensors, usually ``dict[str, Tensor]`` of dotted parameter names.
        batch: anything ``loss_fn`` takes; with ``task_batched`` its tensors carry a leading ``K``.
        wrt: a predicate on dotted names; only the selected parameters are differentiated (the
            others are held constant and left out of the output).
        strategy: ``"vmap"``, ``"loop"`` or ``"auto"`` (module docstring).
        task_batched: form B, ``vmap(grad(loss))`` over per-task batches.
        has_aux: ``loss_fn`` returns ``(losses, aux)``; ``aux`` is returned beside the losses.
        num_tasks: when given, the number of tasks ``K`` is checked against it.

    Returns:
        ``(losses, grads)`` with ``losses`` of shape ``(K,)`` (detached) and ``grads``
        task-stacked: ``grads[name].shape == (K, *params[name].shape)``. With ``has_aux``:
        ``((losses, aux), grads)``.
    """
    _check_strategy(strategy)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    selected, rest = _select(params, wrt)
    if strategy == "auto":
        strategy = choose_strategy(selected)
    if task_batched:
        losses, aux, grads = _task_batched_grads(
            loss_fn, selected, rest, batch, has_aux, strategy, num_tasks
        )
    elif strategy == "vmap":
        losses, aux, grads = _vmap_grads(loss_fn, selected, rest, batch, has_aux, num_tasks)
    else:
        losses, aux, grads = _loop_grads(loss_fn, selected, rest, batch, has_aux, num_tasks)
    losses = losses.detach()
    return ((losses, aux), grads) if has_aux else (losses, grads)


def per_task_grads(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    *,
    wrt: Callable[[str], bool] | None = None,
    strategy: Strategy = "auto",
    task_batched: bool = False,
    has_aux: bool = False,
    num_tasks: int | None = None,
) -> PyTree:
    """Task-stacked gradients of ``loss_fn`` (see :func:`value_and_per_task_grads`)."""
    _, grads = value_and_per_task_grads(
        loss_fn,
        params,
        batch,
        wrt=wrt,
        strategy=strategy,
        task_batched=task_batched,
        has_aux=has_aux,
        num_tasks=num_tasks,
    )
    return grads


def accumulate_per_task_grads(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    into: PyTree,
    *,
    scale: float | Tensor = 1.0,
    wrt: Callable[[str], bool] | None = None,
    strategy: Strategy = "auto",
    task_batched: bool = False,
    has_aux: bool = False,
    num_tasks: int | None = None,
) -> Any:
    """Add ``scale · J`` into the task-stacked buffers ``into``, in place; return the losses.

    The accumulation form of :func:`value_and_per_task_grads`, for gradient accumulation over
    micro-batches: ``into[name][k] += scale · ∂L_k/∂params[name]``. With the ``"loop"`` strategy
    each task's gradient is added straight into its row, so no ``K × n`` stacked copy is made;
    rows of parameters a task does not use are left untouched. ``into`` has the structure of the
    selected ``params`` with a leading ``K`` axis; its dtype may be wider than the parameters'
    (e.g. float32 accumulators for bfloat16 parameters). Eager only (it mutates ``into``).

    Returns ``losses`` (``(K,)``, detached), or ``(losses, aux)`` with ``has_aux``.
    """
    _check_strategy(strategy)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    selected, rest = _select(params, wrt)
    sel_leaves, spec = optree.tree_flatten(selected)
    try:
        into_leaves = spec.flatten_up_to(into)
    except ValueError as err:
        raise ValueError(
            f"`into` must have the structure of the differentiated params: {err}"
        ) from None
    for x, acc in zip(sel_leaves, into_leaves, strict=True):
        if not isinstance(acc, Tensor) or acc.shape[1:] != x.shape or acc.dim() != x.dim() + 1:
            shape = tuple(acc.shape) if isinstance(acc, Tensor) else type(acc).__name__
            raise ValueError(
                f"`into` leaves must have shape (K, *param.shape); got {shape} for a parameter "
                f"of shape {tuple(x.shape)}"
            )
    if strategy == "auto":
        strategy = choose_strategy(selected)
    if strategy == "loop" and not task_batched and not _is_compiling():
        leaves = [x.detach().requires_grad_(True) for x in sel_leaves]
        with torch.enable_grad():
            out, aux = _split_aux(
                loss_fn(_merge(optree.tree_unflatten(spec, leaves), rest), batch), has_aux
            )
            loss_list = _loss_list(out, num_tasks)
            k = len(loss_list)
            if any(acc.shape[0] != k for acc in into_leaves):
                raise ValueError(f"`into` has a task axis that differs from the {k} task losses")
            last = max((i for i, loss in enumerate(loss_list) if loss.requires_grad), default=-1)
            for i, loss in enumerate(loss_list):
                if not loss.requires_grad:
                    continue
                g = torch.autograd.grad(loss, leaves, retain_graph=i < last, allow_unused=True)
                with torch.no_grad():
                    for acc, gi in zip(into_leaves, g, strict=True):
                        if gi is None:
                            continue
                        if isinstance(scale, Tensor):
                            acc[i].add_(gi * scale)
                        else:
                            acc[i].add_(gi, alpha=scale)
        losses = _stack_losses(loss_list).detach()
    else:
        (losses, aux), grads = value_and_per_task_grads(
            lambda p, b: _with_aux(loss_fn(p, b), has_aux),
            params,
            batch,
            wrt=wrt,
            strategy=strategy,
            task_batched=task_batched,
            has_aux=True,
            num_tasks=num_tasks,
        )
        for acc, g in zip(into_leaves, spec.flatten_up_to(grads), strict=True):
            if acc.shape[0] != g.shape[0]:
                raise ValueError(
                    f"`into` has a task axis of {acc.shape[0]} but there are {g.shape[0]} tasks"
                )
            with torch.no_grad():
                if isinstance(scale, Tensor):
                    acc.add_(g * scale)
                else:
                    acc.add_(g, alpha=scale)
    return (losses, aux) if has_aux else losses


def _with_aux(out: Any, has_aux: bool) -> tuple[Any, Any]:
    return out if has_aux else (out, None)


def value_and_weighted_grad(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    weights: Tensor,
    *,
    wrt: Callable[[str], bool] | None = None,
    has_aux: bool = False,
    num_tasks: int | None = None,
) -> tuple[Any, PyTree]:
    """Task losses and the gradient of ``Σ_k w_k L_k`` from ONE forward and ONE backward.

    ``weights`` has shape ``(K,)`` (a 0/1 mask selects a group of tasks). Returns ``(losses (K,),
    grads)`` where ``grads`` has the structure of the selected ``params`` (no task axis); with
    ``has_aux``: ``((losses, aux), grads)``. Traces under ``torch.compile``.
    """
    if not isinstance(weights, Tensor) or weights.dim() != 1:
        raise ValueError("weights must be a 1-D tensor (K,)")
    selected, rest = _select(params, wrt)

    def weighted(sel):
        out, aux = _split_aux(loss_fn(_merge(sel, rest), batch), has_aux)
        losses = _loss_vector(out, num_tasks)
        if losses.shape[0] != weights.shape[0]:
            raise ValueError(
                f"weights has {weights.shape[0]} entries but loss_fn returned "
                f"{losses.shape[0]} losses"
            )
        total = (weights.to(losses.dtype) * losses).sum()
        return total, (losses.detach(), aux)

    if _is_compiling():

        def weighted_func(sel):
            total, (losses, aux) = weighted(sel)
            return total, ((losses, aux) if has_aux else losses)

        grads, out = torch.func.grad(weighted_func, has_aux=True)(selected)
        losses, aux = out if has_aux else (out, None)
    else:
        flat, spec = optree.tree_flatten(selected)
        leaves = [x.detach().requires_grad_(True) for x in flat]
        with torch.enable_grad():
            total, (losses, aux) = weighted(optree.tree_unflatten(spec, leaves))
            g = (
                torch.autograd.grad(total, leaves, allow_unused=True)
                if total.requires_grad
                else (None,) * len(leaves)
            )
        grads = optree.tree_unflatten(spec, _zeros_for_none(g, leaves))
    return ((losses, aux), grads) if has_aux else (losses, grads)


# --------------------------------------------------------------------------------------------
# nn.Module helpers


def split_module(module: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(params, buffers)`` of ``module``.

    ``params``: the trainable parameters (``requires_grad=True``), detached (they share storage with
    the module, so an optimizer step on the module is seen through them). ``buffers``: the named
    buffers (BatchNorm statistics) plus the frozen parameters, which are held constant.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    params: dict[str, Tensor] = {}
    buffers: dict[str, Tensor] = dict(module.named_buffers())
    for name, p in module.named_parameters():
        if p.requires_grad:
            params[name] = p.detach()
        else:
            buffers[name] = p.detach()
    return params, buffers


def functional_loss(
    module: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Any],
    *,
    freeze_running_stats: bool = False,
) -> tuple[dict[str, Tensor], Callable[[Params, Any], Any]]:
    """Turn ``loss_fn(module, batch)`` into a pure ``f(params, batch)`` for the engine.

    Inside ``f`` the module's trainable parameters are replaced by ``params`` (any attribute access
    to the module sees them); frozen parameters and buffers stay the module's own. With
    ``freeze_running_stats=True`` the buffers are replaced by copies, so BatchNorm in train mode
    normalises with batch statistics but leaves the module's running statistics unchanged.

    Returns ``(params, f)`` with ``params`` from :func:`split_module`.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    params, _ = split_module(module)
    if not params:
        raise ValueError("module has no trainable parameter (requires_grad=True)")

    def f(p: Params, batch: Any) -> Any:
        swap: dict[str, Tensor] = dict(p)
        if freeze_running_stats:
            for name, buf in module.named_buffers():
                swap[name] = buf.clone()
        with _reparametrize_module(module, swap):
            return loss_fn(module, batch)

    return params, f
