"""GCond's accumulation cycle: ``A_k = λ_k · (1/D) Σ_{b ∈ B_k} ∇L_k(θ; b)`` over ``N`` micro-batches.

Three modes, one function each:

* classic (float32 / float64): every loss on every micro-batch from ONE forward per micro-batch and
  one backward per loss, added straight into the task-stacked buffers (``D = N``, ``λ_k / N``
  applied once at the end);
* classic in bfloat16: each micro-batch term rounded to bfloat16 before it is added, as the
  reference implementation does;
* stochastic: loss ``k`` on its own block of ``S = N/K`` micro-batches, one forward and one
  backward of that loss alone each (``D = S``; ``λ_k / S`` enters as the backward's seed).

Each returns the accumulated ``A`` (task-stacked, in ``accumulation_dtype``), the λ-weighted and the
raw mean losses ``(K,)``, and which parameters any loss reached (read from the autograd graph).
The buffers are filled in place: fresh ones, or the caller's (``out=``, reused across cycles).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from gradfn import tree
from gradfn._internal.compat import is_compiling
from gradfn.algorithms._conductor._config import ConductorConfig
from gradfn.autodiff._accumulate import accumulate_impl
from gradfn.autodiff._engine import choose_strategy, per_task_impl
from gradfn.autodiff._losses import loss_list, stack_losses
from gradfn.typing import LossFn, PyTree

__all__ = ["Cycle", "accumulate", "next_batch_fn"]


class Cycle(NamedTuple):
    """One accumulation cycle: ``grads`` (task-stacked ``A``), ``losses`` (K,) λ-weighted means,
    ``raw_losses`` (K,) unweighted means, ``reached`` (P,) bool over the parameters' leaves."""

    grads: PyTree
    losses: Tensor
    raw_losses: Tensor
    reached: Tensor


def next_batch_fn(microbatches: Any, n: int) -> Callable[[], Any]:
    """A zero-argument callable returning the next of the ``n`` micro-batches."""
    if callable(microbatches):
        return microbatches
    if isinstance(microbatches, Sequence) and not isinstance(microbatches, (str, bytes)):
        if len(microbatches) != n:
            raise ValueError(
                f"`microbatches` holds {len(microbatches)} batches but accumulation_steps={n}"
            )
        it = iter(microbatches)
        return lambda: next(it)
    raise TypeError(
        "`microbatches` must be a sequence of N batches or a callable returning the next batch, "
        f"got {type(microbatches).__name__}"
    )


class _Setup(NamedTuple):
    """What every mode works with: the config, the loss, the parameters, the micro-batches, the
    task-stacked buffers ``acc`` it fills (their leaves, flat) and the loss weights ``lam`` (K,)."""

    config: ConductorConfig
    loss_fn: LossFn
    params: PyTree
    next_batch: Callable[[], Any]
    acc: list[Tensor]
    lam: Tensor


# Each mode fills ``acc`` and returns the raw mean losses (K,) and which leaves any of its losses
# reached ((P,) bools).
Tally = tuple[Tensor, list[bool]]


def _grad_leaves(params: PyTree) -> tuple[list[Tensor], PyTree]:
    """Detached leaves that require grad, and ``params`` rebuilt from them: one set per cycle,
    every micro-batch's graph starts from them."""
    flat, spec = optree.tree_flatten(params)
    leaves = [x.detach().requires_grad_(True) for x in flat]
    return leaves, optree.tree_unflatten(spec, leaves)


def _reached(rows: list[bool] | None, p: int, into: list[bool]) -> None:
    for j in range(p):
        into[j] = into[j] or (True if rows is None else rows[j])


def _scale_rows(c: _Setup, n: int) -> None:
    """``A_k ← (λ_k / n) A_k``, once per cycle."""
    k = c.config.num_tasks
    scale = (c.lam / n).to(c.config.accumulation_dtype)
    for a in c.acc:
        a.mul_(scale.reshape((k,) + (1,) * (a.dim() - 1)))


def _classic_loop(c: _Setup) -> Tally:
    """One forward per micro-batch and one ``autograd.grad`` per loss (graph retained), each
    gradient added into its buffer row (the first one copied), ``λ_k/N`` applied at the end."""
    k, n = c.config.num_tasks, c.config.accumulation_steps
    leaves, params = _grad_leaves(c.params)
    p = len(leaves)
    rows = [[a[i] for a in c.acc] for i in range(k)]  # row views, made once
    written = [[False] * p for _ in range(k)]
    raw: list[Tensor] = []
    for _ in range(n):
        with torch.enable_grad():
            losses = loss_list(c.loss_fn(params, c.next_batch()), k)
            last = max((i for i, loss in enumerate(losses) if loss.requires_grad), default=-1)
            for i, loss in enumerate(losses):
                if not loss.requires_grad:
                    continue
                grads = torch.autograd.grad(loss, leaves, retain_graph=i < last, allow_unused=True)
                with torch.no_grad():
                    for j, g in enumerate(grads):
                        if g is None:
                            continue
                        if written[i][j]:
                            rows[i][j].add_(g)
                        else:
                            rows[i][j].copy_(g)
                            written[i][j] = True
        raw.extend(losses)
    with torch.no_grad():
        for i in range(k):
            for j in range(p):
                if not written[i][j]:  # a loss that never reached this leaf
                    rows[i][j].zero_()
        _scale_rows(c, n)
    reached = [any(written[i][j] for i in range(k)) for j in range(p)]
    return _mean_losses(raw, n, k, 0), reached


def _mean_losses(raw: list[Tensor], d: int, k: int, dim: int) -> Tensor:
    """``(K,)`` float32 means ``Σ L / D`` of the collected 0-d losses: laid out ``(N, K)``
    (``dim = 0``) or ``(K, S)`` (``dim = 1``)."""
    values = stack_losses(raw).detach().float() / d
    return values.reshape((-1, k) if dim == 0 else (k, -1)).sum(dim=dim)


def _classic_batched(c: _Setup) -> Tally:
    """Classic mode with the engine's batched strategy (``vmap``)."""
    k, n = c.config.num_tasks, c.config.accumulation_steps
    into = optree.tree_unflatten(optree.tree_structure(c.params), c.acc)
    reached = [False] * len(c.acc)
    raw: list[Tensor] = []
    for a in c.acc:
        a.zero_()
    for _ in range(n):
        losses, _, usage = accumulate_impl(
            c.loss_fn,
            c.params,
            c.next_batch(),
            into,
            1.0,
            None,
            c.config.strategy,
            False,
            False,
            k,
        )
        raw.append(losses)
        _reached(None if usage is None else usage.any(dim=0).tolist(), len(c.acc), reached)
    _scale_rows(c, n)
    return (torch.stack(raw).float() / n).sum(dim=0), reached


def _classic_bf16(c: _Setup) -> Tally:
    """Classic mode, each micro-batch's ``λ_k/N``-weighted term rounded to bfloat16."""
    k, n, dt = c.config.num_tasks, c.config.accumulation_steps, c.config.accumulation_dtype
    scale = c.lam / n
    reached = [False] * len(c.acc)
    raw: list[Tensor] = []
    for i in range(n):
        losses, _, grads, usage = per_task_impl(
            c.loss_fn,
            c.params,
            c.next_batch(),
            None,
            c.config.strategy,
            False,
            False,
            k,
            None,
            True,
        )
        for a, g in zip(c.acc, tree.leaves(grads), strict=True):
            term = (g.float() * scale.reshape((k,) + (1,) * (g.dim() - 1))).to(dt)
            if i == 0:
                a.copy_(term)
            else:
                a.add_(term)
        raw.append(losses.detach())
        _reached(None if usage is None else usage.any(dim=0).tolist(), len(c.acc), reached)
    return (torch.stack(raw).float() / n).sum(dim=0), reached


def _seed(losses: list[Tensor], task: int, weight: float) -> Tensor:
    """``weight`` as the backward seed of loss ``task``: rounded to float32, to the losses'
    common dtype, then to the loss's own, as the gradient of a weighted sum of the losses is."""
    dtype = losses[0].dtype
    for loss in losses[1:]:
        dtype = torch.promote_types(dtype, loss.dtype)
    loss = losses[task]
    seed = torch.tensor(weight, dtype=torch.float32, device=loss.device)
    return seed.to(dtype).to(loss.dtype)


def _stochastic(c: _Setup) -> Tally:
    """Loss ``k`` alone on each micro-batch of its block, its backward seeded with ``λ_k/S``.
    The first two gradients of a block are summed straight into the buffer row (no copy)."""
    k, n, dt = c.config.num_tasks, c.config.accumulation_steps, c.config.accumulation_dtype
    s = n // k
    leaves, params = _grad_leaves(c.params)
    p = len(leaves)
    reached = [False] * p
    raw: list[Tensor] = []
    for task in range(k):
        rows = [a[task] for a in c.acc]
        held: Sequence[Tensor | None] = ()
        for i in range(s):
            row: Sequence[Tensor | None] = (None,) * p
            with torch.enable_grad():
                losses = loss_list(c.loss_fn(params, c.next_batch()), k)
                loss = losses[task]
                if loss.requires_grad:
                    seed = _seed(losses, task, c.config.lambdas[task] / s)
                    row = torch.autograd.grad(loss, leaves, grad_outputs=seed, allow_unused=True)
            raw.append(loss)
            _reached([g is not None for g in row], p, reached)
            if i == 0 and s > 1:
                held = row  # summed with the next one
                continue
            with torch.no_grad():
                for j, out in enumerate(rows):
                    _add_row(out, held[j] if i == 1 else None, row[j], i, dt)
    return _mean_losses(raw, s, k, 1), reached


def _add_row(out: Tensor, first: Tensor | None, g: Tensor | None, i: int, dt: torch.dtype) -> None:
    """Micro-batch ``i``'s gradient ``g`` into the row ``out`` (``None``: not reached, zeros);
    at ``i = 1``, ``first`` is micro-batch 0's, and ``out`` is overwritten."""
    if i >= 2:
        if g is not None:
            out.add_(g.to(dt))
        return
    if i == 0 or first is None:
        if g is None:
            out.zero_()
        else:
            out.copy_(g)
        return
    if g is None:
        out.copy_(first)
    elif first.dtype == g.dtype == dt:
        torch.add(first, g, out=out)  # = copy_(first) then add_(g), in one pass
    else:
        out.copy_(first)
        out.add_(g.to(dt))


def new_buffers(config: ConductorConfig, params: PyTree) -> PyTree:
    """Task-stacked buffers ``(K, *p.shape)`` in the accumulation dtype (uninitialised)."""
    k, dt = config.num_tasks, config.accumulation_dtype
    return tree.tree_map(lambda p: torch.empty((k, *p.shape), dtype=dt, device=p.device), params)


def accumulate(
    config: ConductorConfig,
    loss_fn: LossFn,
    params: PyTree,
    microbatches: Any,
    *,
    out: PyTree | None = None,
) -> Cycle:
    """One accumulation cycle (module docstring). Eager: it fills task-stacked buffers in place,
    ``out`` (overwritten; e.g. reused across cycles) or fresh ones."""
    next_batch = next_batch_fn(microbatches, config.accumulation_steps)
    device = tree.leaves(params)[0].device
    lam = torch.tensor(config.lambdas, dtype=torch.float32, device=device)
    acc = new_buffers(config, params) if out is None else out
    if config.stochastic:
        mode = _stochastic
    elif config.accumulation_dtype == torch.bfloat16:
        mode = _classic_bf16
    elif config.strategy == "loop" or (
        config.strategy == "auto" and not is_compiling() and choose_strategy(params) == "loop"
    ):
        mode = _classic_loop
    else:
        mode = _classic_batched
    raw, reached = mode(_Setup(config, loss_fn, params, next_batch, tree.leaves(acc), lam))
    return Cycle(acc, raw * lam, raw, torch.tensor(reached, dtype=torch.bool))
