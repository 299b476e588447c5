"""The Gramian ``G = J Jᵀ`` (``K×K``) of ``K`` losses without the ``K × n`` Jacobian.

Jacobian descent with a Gramian weighting (Quinton & Rey 2024, arXiv:2406.16232, Section 6)
needs only ``G`` and then one backward of ``Σ_k w_k L_k``. Since ``J = [J_1 … J_P]`` splits over
the leaves (parameters), ``G = Σ_p J_p J_pᵀ``: each leaf's ``K`` rows ``J_p`` (``K × n_p``) are
folded into ``G`` as soon as autograd has them, and freed.

Mechanism: one backward of the ``K`` losses vmapped over the one-hot cotangents
(``torch.vmap`` around ``torch.autograd.grad``), with a tensor hook on every leaf. Autograd runs a
leaf's hook once its gradient is complete (all uses summed), during the backward, not at its end.
Inside ``vmap`` the hook sees one task's gradient; it reads the whole ``(K, *shape)`` batch
behind it (functorch's unwrapping, as ``torch.func`` does; an ``autograd.Function`` with a
``vmap`` rule gives the same numbers at about 1 ms more per leaf), adds ``J_p J_pᵀ`` to ``G``
(or, for leaves whose per-task gradients are only summed, ``Σ_k J_p[k]`` to a buffer), and
returns a stride-0 zero in place of the gradient, so autograd keeps nothing of it. Peak memory: the
activations' cotangents for ``K`` tasks plus the ``K`` rows of the leaves in flight (one leaf at a
time in a chain of layers), never ``K × n``. Time: the same batched backward as the row path's
``"vmap"`` strategy and the same ``Σ_p K² n_p`` Gramian work (TorchJD's autogram instead hooks
modules and differentiates each module again under ``vmap``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch._C import _functorch as _ft

__all__ = ["Streamed", "gramian", "stream_gramian"]


class Streamed(NamedTuple):
    """What :func:`stream_gramian` returns.

    ``gram``: ``G`` (``K×K``, float32; float64 for float64 leaves). ``sums``: per summed leaf,
    ``Σ_k ∂L_k/∂x`` (``None``: no task reaches it). ``reached``: per Gramian leaf, whether any
    task reaches it. ``parts``: per Gramian leaf, its ``J_p J_pᵀ`` (``None``: unreached), to name
    the leaves behind a non-finite ``G``.
    """

    gram: Tensor
    sums: list[Tensor | None]
    reached: list[bool]
    parts: list[Tensor | None]


class _Sink:
    """Where the hooks put what they fold: ``G`` (float64) and the per-task sums."""

    def __init__(
        self,
        k: int,
        device: torch.device,
        n_gram: int,
        n_sum: int,
        also: Callable[[int, Tensor], None] | None = None,
        gram: bool = True,
    ) -> None:
        self.k, self.also, self.want_gram = k, also, gram
        self.gram = torch.zeros((k, k), dtype=torch.float64, device=device)
        self.parts: list[Tensor | None] = [None] * n_gram
        self.sums: list[Tensor | None] = [None] * n_sum

    def fold(self, index: int, summed: bool, rows: Tensor) -> None:
        """``rows``: the ``(K, *shape)`` task-stacked gradient of one leaf."""
        if summed:
            s = rows.sum(0)
            prev = self.sums[index]
            self.sums[index] = s if prev is None else prev + s
            return
        if self.also is not None:
            self.also(index, rows)
        if not self.want_gram:
            return
        r = rows.reshape(self.k, -1)
        if r.dtype is not torch.float32 and r.dtype is not torch.float64:
            r = r.to(torch.float32)
        part = (r @ r.mT).to(torch.float64)
        prev_part = self.parts[index]
        self.parts[index] = part if prev_part is None else prev_part + part
        self.gram += part


def _task_rows(g: Tensor, k: int) -> Tensor:
    """The ``(K, *shape)`` tensor behind one task's view ``g`` inside ``torch.vmap``.

    functorch's own accessors (``torch._C._functorch``, as ``torch.func`` uses them): the
    innermost vmap level is ours; a gradient not batched there is the same for every task.
    """
    if not _ft.is_batchedtensor(g):
        return g.unsqueeze(0).expand(k, *g.shape)
    phys, bdim = _ft._unwrap_batched(g, _ft.maybe_get_level(g))
    if bdim is None:
        return phys.unsqueeze(0).expand(k, *phys.shape)
    return phys.movedim(bdim, 0)


def _hook(sink: _Sink, index: int, summed: bool) -> Any:
    def hook(g: Tensor) -> Tensor:
        if g.layout != torch.strided:
            raise RuntimeError(
                "gramian: a sparse gradient (e.g. a sparse embedding) cannot be folded under vmap"
            )
        sink.fold(index, summed, _task_rows(g, sink.k))
        # a stride-0 zero in place of the gradient: autograd keeps nothing of it
        return torch.zeros((), dtype=g.dtype, device=g.device).expand(g.shape)

    return hook


def stream_gramian(
    losses: Sequence[Tensor],
    inputs: Sequence[Tensor],
    summed: Sequence[Tensor] = (),
    *,
    retain_graph: bool = False,
    also: Callable[[int, Tensor], None] | None = None,
    gram: bool = True,
) -> Streamed:
    """``G`` of ``losses`` w.r.t. ``inputs`` and ``Σ_k ∂L_k/∂x`` for ``x`` in ``summed``, from
    one batched backward that never holds more than the leaves in flight (module docstring).

    ``losses``: ``K`` scalars (a loss that does not require grad has a zero row).
    ``retain_graph``: keep the graph for a later backward (the weighted one).
    ``also(j, rows)``: called with each Gramian leaf's index and ``(K, *shape)`` rows while they
    exist (e.g. to sketch them); it must not keep them.
    ``gram=False``: only ``also`` and the sums, no Gramian work (``K² n``): ``gram`` is returned
    zero and ``parts`` ``None``.
    """
    k = len(losses)
    leaves = [*inputs, *summed]
    if not leaves:
        raise ValueError("gramian: `inputs` is empty")
    for x in leaves:
        # a hook replaces the gradient by zeros: on a non-leaf it would cut what flows past it
        if not isinstance(x, Tensor) or not x.requires_grad or x.grad_fn is not None:
            raise ValueError("gramian: every input must be a leaf tensor that requires grad")
    if len({id(x) for x in leaves}) != len(leaves):
        raise ValueError("gramian: an input appears twice in `inputs`")
    device = leaves[0].device
    sink = _Sink(k, device, len(inputs), len(summed), also, gram)
    live = [i for i, loss in enumerate(losses) if loss.requires_grad]
    reached = [False] * len(inputs)
    if live:
        dtype = losses[live[0]].dtype
        eye = torch.eye(k, dtype=dtype, device=losses[live[0]].device)
        handles = [x.register_hook(_hook(sink, j, False)) for j, x in enumerate(inputs)]
        handles += [x.register_hook(_hook(sink, j, True)) for j, x in enumerate(summed)]

        def vjp(v: Tensor) -> Tensor:
            grads = torch.autograd.grad(
                [losses[i] for i in live],
                leaves,
                grad_outputs=[v[i].to(losses[i].dtype) for i in live],
                retain_graph=retain_graph,
                allow_unused=True,
            )
            for j in range(len(inputs)):
                reached[j] = reached[j] or grads[j] is not None
            return v.new_zeros(())

        try:
            with torch.enable_grad():
                torch.vmap(vjp)(eye)
        finally:
            for h in handles:
                h.remove()
    g = sink.gram
    wide = any(x.dtype == torch.float64 for x in inputs)
    return Streamed(g if wide else g.to(torch.float32), sink.sums, reached, sink.parts)


def gramian(
    losses: Sequence[Tensor] | Tensor, inputs: Sequence[Tensor], *, retain_graph: bool = False
) -> Tensor:
    """``G = J Jᵀ`` (``K×K``) of ``K`` scalar losses w.r.t. ``inputs``, leaf by leaf.

    Only one leaf's ``K`` rows exist at a time (module docstring); pass ``retain_graph=True`` to
    backpropagate ``Σ_k w_k L_k`` afterwards, as :func:`gradfn.aggregators.backward` does with
    ``gramian="streaming"``. ``G`` is float32 (float64 when a leaf is float64).
    """
    items = list(losses.reshape(-1).unbind(0)) if isinstance(losses, Tensor) else list(losses)
    if not items or not all(isinstance(x, Tensor) and x.numel() == 1 for x in items):
        raise ValueError("gramian: `losses` must be a non-empty sequence of scalar tensors")
    if isinstance(inputs, Tensor):
        raise TypeError("gramian: `inputs` must be a sequence of tensors, not one tensor")
    return stream_gramian(
        [x.reshape(()) for x in items], list(inputs), retain_graph=retain_graph
    ).gram
