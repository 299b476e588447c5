"""GCond's accumulation cycle: ``A_k = λ_k · (1/D) Σ_{b ∈ B_k} ∇L_k(θ; b)`` over ``N`` micro-batches.

Three modes, one function each:

* classic (float32 / float64): every loss on every micro-batch from ONE forward per micro-batch,
  added straight into the task-stacked buffers (``D = N``, ``λ_k / N`` applied once at the end);
* classic in bfloat16: each micro-batch term rounded to bfloat16 before it is added, as the
  reference implementation does;
* stochastic: loss ``k`` on its own block of ``S = N/K`` micro-batches, one forward and one backward
  each (``D = S``).

Each returns the accumulated ``A`` (task-stacked, in ``accumulation_dtype``), the λ-weighted and the
raw mean losses ``(K,)``, and which parameters any loss reached (read from the autograd graph).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradfn import tree
from gradfn.algorithms._conductor._config import ConductorConfig
from gradfn.autodiff._accumulate import accumulate_impl
from gradfn.autodiff._engine import per_task_impl
from gradfn.autodiff._weighted import weighted_impl
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


def _any_row(usage: Tensor | None, num_leaves: int) -> Tensor:
    """``(P,)`` bool: leaves reached by any row of a ``(R, P)`` usage (all, when unknown)."""
    if usage is None:
        return torch.ones(num_leaves, dtype=torch.bool)
    return usage.any(dim=0)


class _Setup(NamedTuple):
    """What every mode works with: the config, the loss, the parameters, the micro-batches, the
    task-stacked buffers ``acc`` it fills and the loss weights ``lam`` (K,)."""

    config: ConductorConfig
    loss_fn: LossFn
    params: PyTree
    next_batch: Callable[[], Any]
    acc: PyTree
    lam: Tensor


# Each mode fills ``acc`` and yields, per micro-batch, its contribution to the raw mean losses
# (K,) and which parameters it reached ((R, P) bool, or None when unknown).
Tally = Iterator[tuple[Tensor, Tensor | None]]


def _classic(c: _Setup) -> Tally:
    k, n = c.config.num_tasks, c.config.accumulation_steps
    for a in tree.leaves(c.acc):
        a.zero_()
    for _ in range(n):
        losses, _, usage = accumulate_impl(
            c.loss_fn,
            c.params,
            c.next_batch(),
            c.acc,
            1.0,
            None,
            c.config.strategy,
            False,
            False,
            k,
        )
        yield losses.float() / n, usage
    scale = (c.lam / n).to(c.config.accumulation_dtype)
    for a in tree.leaves(c.acc):
        a.mul_(scale.reshape((k,) + (1,) * (a.dim() - 1)))


def _classic_bf16(c: _Setup) -> Tally:
    k, n, dt = c.config.num_tasks, c.config.accumulation_steps, c.config.accumulation_dtype
    scale = c.lam / n
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
        for a, g in zip(tree.leaves(c.acc), tree.leaves(grads), strict=True):
            term = (g.float() * scale.reshape((k,) + (1,) * (g.dim() - 1))).to(dt)
            if i == 0:
                a.copy_(term)
            else:
                a.add_(term)
        yield losses.detach().float() / n, usage


def _stochastic(c: _Setup) -> Tally:
    k, n, dt = c.config.num_tasks, c.config.accumulation_steps, c.config.accumulation_dtype
    s = n // k
    eye = torch.eye(k, dtype=torch.float32, device=c.lam.device)
    acc_leaves = tree.leaves(c.acc)
    for task in range(k):
        weight = eye[task] * (c.config.lambdas[task] / s)
        for i in range(s):
            losses, _, grad, usage = weighted_impl(
                c.loss_fn, c.params, c.next_batch(), weight, None, False, k
            )
            for a, g in zip(acc_leaves, tree.leaves(grad), strict=True):
                if i == 0:
                    a[task].copy_(g)
                else:
                    a[task].add_(g.to(dt))
            yield (
                eye[task] * losses.detach().float()[task] / s,
                None if usage is None else usage[None],
            )


def accumulate(
    config: ConductorConfig, loss_fn: LossFn, params: PyTree, microbatches: Any
) -> Cycle:
    """One accumulation cycle (module docstring). Eager: it fills fresh buffers in place."""
    k = config.num_tasks
    next_batch = next_batch_fn(microbatches, config.accumulation_steps)
    device = tree.leaves(params)[0].device
    lam = torch.tensor(config.lambdas, dtype=torch.float32, device=device)
    # fresh buffers every cycle (the state may keep the previous cycle's A as `prev`)
    acc = tree.tree_map(
        lambda p: torch.empty((k, *p.shape), dtype=config.accumulation_dtype, device=p.device),
        params,
    )
    if config.stochastic:
        mode = _stochastic
    elif config.accumulation_dtype == torch.bfloat16:
        mode = _classic_bf16
    else:
        mode = _classic
    p = len(tree.leaves(acc))
    raw = torch.zeros(k, dtype=torch.float32, device=device)
    reached = torch.zeros(p, dtype=torch.bool)
    for contribution, usage in mode(_Setup(config, loss_fn, params, next_batch, acc, lam)):
        raw = raw + contribution
        reached = reached | _any_row(usage, p)
    return Cycle(acc, raw * lam, raw, reached)
