"""``backward``: an aggregator from an ``nn.Module`` training loop, writing ``p.grad``.

The per-task Jacobian ``J = ∂L/∂θ`` (``K × n``) comes from the engine's fast path
(:func:`gradfn.autodiff.choose_strategy`): on the CPU one ``autograd.grad`` per task, each started
at that task's own loss (so it visits only the part of the graph the task uses) and the graph
freed by the last one; on accelerators one batched backward (vmap over autograd). The rows are
written straight into one preallocated ``(K, n)`` buffer whose per-parameter views are what the
aggregator sees, and its Gramian ``G = J Jᵀ`` is one matmul. The update is the aggregation
``d = A(J)`` of Jacobian descent (Quinton & Rey 2024), ``d = Σ_k w_k g_k = wᵀ J`` for a weighting
``w = W(G)``.

Trunk-only mode (TorchJD's ``mtl_backward``): with ``shared=`` (or ``features=``) only the shared
parameters' Jacobian is aggregated, and every other parameter (a task's head) gets the gradient
of ``Σ_k L_k``: its own task's gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradfn import tree
from gradfn._internal.checks import check_choice
from gradfn.aggregators._backward_inputs import (
    Losses,
    Shared,
    as_features,
    loss_list,
    named_params,
    resolve,
)
from gradfn.aggregators._backward_inputs import shared_names as select_shared
from gradfn.aggregators._base import Aggregated, Aggregator
from gradfn.aggregators._streaming import GRAMIAN_PATHS, choose_gramian, streaming_backward
from gradfn.autodiff._engine import choose_strategy
from gradfn.autodiff._usage import reached_leaves

__all__ = ["backward"]

# --------------------------------------------------------------------------------------------
# per-task gradients


class _Rows:
    """Task-stacked gradients of some parameters: one ``(K, n)`` buffer (when they share a dtype
    and device) whose column blocks, viewed as ``(K, *shape)``, are the per-parameter leaves."""

    def __init__(self, k: int, names: list[str], tensors: list[Tensor]) -> None:
        self.k, self.names, self.tensors = k, names, tensors
        self.reached = [False] * len(tensors)
        first = tensors[0]
        self.flat: Tensor | None = None
        self.rows: list[list[Tensor | None]] = []
        if all(t.dtype == first.dtype and t.device == first.device for t in tensors):
            n = sum(t.numel() for t in tensors)
            self.flat = torch.empty((k, n), dtype=first.dtype, device=first.device)
            self.sizes = [t.numel() for t in tensors]

    def put(self, i: int, grads: Sequence[Tensor | None]) -> None:
        """Row ``i``: one task's gradients (``None``: the task does not reach that parameter)."""
        grads = [_dense(g) for g in grads]
        for j, g in enumerate(grads):
            if g is not None:
                self.reached[j] = True
        if self.flat is None:
            self.rows.append(list(grads))
            return
        if all(g is not None for g in grads):
            torch.cat([g.reshape(-1) for g in grads], out=self.flat[i])  # type: ignore[union-attr]
            return
        for g, part, t in zip(grads, self.flat[i].split(self.sizes), self.tensors, strict=True):
            if g is None:
                part.zero_()
            else:
                part.copy_(g.reshape(-1).to(t.dtype))

    def put_stacked(self, grads: Sequence[Tensor | None]) -> None:
        """All ``K`` rows at once: ``(K, *shape)`` per parameter (a batched backward)."""
        self.flat = None
        grads = [_dense(g) for g in grads]
        self.stacked = [
            torch.zeros((self.k, *t.shape), dtype=t.dtype, device=t.device) if g is None else g
            for g, t in zip(grads, self.tensors, strict=True)
        ]
        self.reached = [g is not None for g in grads]

    def tree(self) -> dict[str, Tensor]:
        """name → ``(K, *shape)`` (views of the buffer when there is one)."""
        if self.flat is not None:
            parts = self.flat.split(self.sizes, dim=1)
            return {
                n: p.view(self.k, *t.shape)
                for n, p, t in zip(self.names, parts, self.tensors, strict=True)
            }
        if not hasattr(self, "stacked"):
            self.stacked = [
                torch.stack(
                    [torch.zeros_like(t) if r[j] is None else r[j] for r in self.rows]  # type: ignore[misc]
                )
                for j, t in enumerate(self.tensors)
            ]
        return dict(zip(self.names, self.stacked, strict=True))

    def split(self, vec: Tensor) -> dict[str, Tensor]:
        """A flat ``(n,)`` vector as name → tensor of each parameter's shape (views)."""
        parts = vec.split(self.sizes)
        return {n: p.view(t.shape) for n, p, t in zip(self.names, parts, self.tensors, strict=True)}

    def gram(self) -> Tensor:
        """``G = J Jᵀ`` in float32 (float64 for float64 gradients), as the aggregators take it."""
        if self.flat is not None:
            wide = self.flat.dtype == torch.float64
            rows = self.flat.to(torch.float64 if wide else torch.float32)
            return rows @ rows.T
        return tree.gramian(self.tree(), dtype=None)


def _dense(g: Tensor | None) -> Tensor | None:
    """A sparse gradient (e.g. of a sparse embedding) as a dense tensor."""
    return g if g is None or g.layout == torch.strided else g.to_dense()


def _add(acc: list[Tensor | None], grads: Sequence[Tensor | None]) -> None:
    """Sum one task's gradients of the unshared parameters into ``acc``."""
    for j, g in enumerate(grads):
        g = _dense(g)
        if g is not None:
            acc[j] = g if acc[j] is None else acc[j] + g  # type: ignore[operator]


def _direct(
    losses: list[Tensor], shared: _Rows, heads: list[Tensor], strategy: str
) -> list[Tensor | None]:
    """Rows of ``J`` for the shared parameters and ``Σ_k ∂L_k/∂head`` for the others, from the
    losses themselves: one backward per task (the last frees the graph), or one batched one."""
    k, ns = len(losses), len(shared.tensors)
    inputs = shared.tensors + heads
    head_sum: list[Tensor | None] = [None] * len(heads)
    live = [i for i, loss in enumerate(losses) if loss.requires_grad]
    if strategy == "vmap" and live:
        eye = torch.eye(k, dtype=losses[live[0]].dtype, device=losses[live[0]].device)
        grads = torch.autograd.grad(
            [losses[i] for i in live],
            inputs,
            grad_outputs=[eye[:, i].to(losses[i].dtype) for i in live],
            is_grads_batched=True,
            allow_unused=True,
        )
        shared.put_stacked(grads[:ns])
        _add(head_sum, [None if g is None else g.sum(0) for g in grads[ns:]])
        return head_sum
    none = (None,) * len(inputs)
    for i, loss in enumerate(losses):
        row: Sequence[Tensor | None] = none
        if loss.requires_grad:
            row = torch.autograd.grad(loss, inputs, retain_graph=i < live[-1], allow_unused=True)
        shared.put(i, row[:ns])
        _add(head_sum, row[ns:])
    return head_sum


def _through_features(
    losses: list[Tensor], feats: list[Tensor], shared: _Rows, heads: list[Tensor], strategy: str
) -> list[Tensor | None]:
    """TorchJD's ``mtl_backward``: per task, ``∂L_k/∂(features, head)``; then the shared rows
    ``(∂L_k/∂features) ∂features/∂θ`` (a backward per task, or one batched)."""
    nf = len(feats)
    head_sum: list[Tensor | None] = [None] * len(heads)
    cot: list[list[Tensor]] = []
    for loss in losses:
        row: Sequence[Tensor | None] = (None,) * (nf + len(heads))
        if loss.requires_grad:
            row = torch.autograd.grad(loss, feats + heads, retain_graph=True, allow_unused=True)
        cot.append(
            [torch.zeros_like(f) if g is None else g for g, f in zip(row[:nf], feats, strict=True)]
        )
        _add(head_sum, row[nf:])
    if strategy == "vmap":
        grads = torch.autograd.grad(
            feats,
            shared.tensors,
            grad_outputs=[torch.stack([c[j] for c in cot]) for j in range(nf)],
            is_grads_batched=True,
            allow_unused=True,
        )
        shared.put_stacked(grads)
        return head_sum
    for i, c in enumerate(cot):
        shared.put(
            i,
            torch.autograd.grad(
                feats,
                shared.tensors,
                grad_outputs=c,
                retain_graph=i < len(cot) - 1,
                allow_unused=True,
            ),
        )
    return head_sum


# --------------------------------------------------------------------------------------------
# public API


def backward(
    losses: Losses,
    params: nn.Module | Mapping[str, Tensor] | Iterable[Tensor],
    agg: Aggregator | str | Callable[..., Aggregated],
    *,
    state: Any = None,
    shared: Shared | None = None,
    features: Tensor | Sequence[Tensor] | None = None,
    strategy: str = "auto",
    parallel: bool | None = None,
    gramian: str = "auto",
    memory_budget: int | None = None,
    **hparams: Any,
) -> tuple[Any, Aggregated]:
    """Per-task gradients of ``losses`` w.r.t. ``params``, aggregated, accumulated into ``.grad``.

    With ``J`` the ``K × n`` Jacobian of the losses, ``.grad += A(J) = Σ_k w_k g_k`` (for the
    shared parameters only in trunk-only mode, where the others get ``Σ_k ∂L_k/∂θ``).

    Args:
        losses: ``K`` scalar losses from one forward: a sequence, a dict ``{name: loss}`` or a
            ``(K,)`` tensor. Prefer a sequence or a dict: each task's backward then starts at its
            own loss and visits only the part of the graph the task uses (the elements of a
            stacked tensor all reach every task's graph).
        params: an ``nn.Module`` (its trainable parameters), a name → tensor mapping or an
            iterable of tensors.
        agg: an :class:`Aggregator`, a method name (with ``**hparams``) or a pure aggregate fn.
        state: the aggregator's state from the previous call (``None``: ``agg.init(K)``).
        shared: trunk-only mode. The shared parameters (a predicate on the names of ``params``,
            an ``nn.Module`` or an iterable of tensors): only their ``K``-row Jacobian is
            aggregated; every other parameter of ``params`` gets the gradient of ``Σ_k L_k``
            (its own task's gradient for a task head) in the same backward passes.
        features: trunk-only mode as TorchJD's ``mtl_backward(losses, features)``: the shared
            representation (one or more tensors) the heads read. Each task is differentiated
            w.r.t. ``features`` and its head, then the ``K`` feature gradients are
            backpropagated through the trunk. The shared parameters default to those of
            ``params`` that ``features`` depend on; the trunk Jacobian is taken through
            ``features`` only.
        strategy: ``"auto"`` (:func:`gradfn.autodiff.choose_strategy`: one backward per task on
            the CPU, one batched backward on accelerators), ``"loop"`` or ``"vmap"`` (needs a
            batching rule for every op of the backward). Sparse gradients are made dense.
        parallel: deprecated alias: ``True`` is ``strategy="vmap"``, ``False`` ``"loop"``.
        gramian: ``"rows"`` (the ``K × n`` rows, then ``G`` and ``wᵀ J``), ``"streaming"``
            (``G`` folded leaf by leaf in one batched backward, then one backward of
            ``Σ_k w_k L_k``: the rows never exist; aggregators with a ``weighting`` only, not
            with ``features=``) or ``"auto"``: ``"streaming"`` with a warning when the rows
            would exceed ``memory_budget``, else ``"rows"``.
        memory_budget: bytes the rows may take for ``gramian="auto"`` (default: the free
            memory of a CUDA device; none on the CPU, where ``"auto"`` keeps the rows).

    Returns:
        ``(state, Aggregated)``; ``Aggregated.grad`` is keyed like ``params`` (dotted names for a
        module), the shared parameters only in trunk-only mode. Parameters no loss reaches keep
        their ``.grad``. With ``gramian="streaming"`` a parameter whose ``.grad`` was ``None``
        gets the very tensor of ``Aggregated.grad`` (no second copy).

    Raises:
        ValueError: a non-finite loss or gradient (nothing is written to ``.grad``), empty or
            mismatched input, ``gramian="streaming"`` with an aggregator that needs the rows.
        TypeError: an argument of the wrong kind.
        RuntimeError: the batched backward (``strategy="vmap"``) failed, e.g. on an op without a
            batching rule such as a sparse embedding: pass ``strategy="loop"``.
    """
    check_choice("strategy", strategy, ("auto", "vmap", "loop"))
    check_choice("gramian", gramian, GRAMIAN_PATHS)
    if parallel is not None:
        strategy = "vmap" if parallel else "loop"
    a = resolve(agg, hparams)
    loss = loss_list(losses)
    values = torch.stack([x.detach() for x in loss])
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"backward: non-finite loss in {values.tolist()}")
    named = named_params(params)
    feats = None if features is None else as_features(features)
    if shared is not None:
        shared_names = select_shared(shared, named)
    elif feats is not None:
        tensors = list(named.values())
        hit = [any(col) for col in zip(*(reached_leaves(f, tensors) for f in feats), strict=True)]
        shared_names = [n for n, h in zip(named, hit, strict=True) if h]
        if not shared_names:
            raise ValueError("backward: `features` depends on none of `params`")
    else:
        shared_names = list(named)
    head_names = [n for n in named if n not in set(shared_names)]
    heads = [named[n] for n in head_names]
    path = choose_gramian(
        gramian,
        memory_budget,
        a,
        k=len(loss),
        shared=[named[n] for n in shared_names],
        features=feats is not None,
        strategy=strategy,
    )
    if path == "streaming":
        return streaming_backward(loss, named, shared_names, head_names, a, state)
    rows = _Rows(len(loss), shared_names, [named[n] for n in shared_names])
    if strategy == "auto":
        strategy = choose_strategy(rows.tensors)
    with torch.enable_grad():
        try:
            if feats is None:
                head_sum = _direct(loss, rows, heads, strategy)
            else:
                head_sum = _through_features(loss, feats, rows, heads, strategy)
        except RuntimeError as err:
            if strategy != "vmap":
                raise
            raise RuntimeError(
                "backward: the batched backward (strategy='vmap', the default on accelerators) "
                f"failed, e.g. an op without a batching rule; pass strategy='loop'. ({err})"
            ) from err
    gram = rows.gram()
    # a non-finite row makes its diagonal Gramian entry non-finite: no pass over J is needed
    present = [g for g in head_sum if g is not None]
    finite = torch.isfinite(gram).all()
    if present:
        finite = (
            finite & torch.isfinite(torch.stack(torch._foreach_norm(present, float("inf")))).all()
        )
    if not bool(finite):
        bad = [n for n, g in rows.tree().items() if not bool(torch.isfinite(g).all())]
        bad += [
            n
            for n, g in zip(head_names, head_sum, strict=True)
            if g is not None and not bool(torch.isfinite(g).all())
        ]
        if not bad:
            raise ValueError("backward: non-finite Gramian (the per-task gradients overflow)")
        raise ValueError(f"backward: non-finite per-task gradient for {bad}")
    if state is None:
        state = a.init(len(loss), device=values.device)
    if a.weighting is not None and rows.flat is not None:
        # a weighting of the Gramian: w from G alone, then d = wᵀ J as one product over the
        # (K, n) buffer (the aggregator's update would do the same leaf by leaf)
        state, w = a.weighting(state, gram)
        out = Aggregated(rows.split(w.to(rows.flat.dtype) @ rows.flat), w)
    else:
        state, out = a.update(state, rows.tree(), gram=gram)
    with torch.no_grad():
        for n, reached in zip(shared_names, rows.reached, strict=True):
            if reached:
                _accumulate(named[n], out.grad[n], copy=True)
        for p, g in zip(heads, head_sum, strict=True):
            if g is not None:
                _accumulate(p, g, copy=False)
    return state, out


def _accumulate(p: Tensor, g: Tensor, *, copy: bool) -> None:
    g = g.to(p.dtype)
    if p.grad is None:
        p.grad = g.clone() if copy else g
    else:
        p.grad.add_(g)
