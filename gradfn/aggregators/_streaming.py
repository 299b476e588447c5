"""The Gramian-first path of :func:`gradfn.aggregators.backward` (``gramian="streaming"``).

``G = J Jᵀ`` comes from one batched backward that folds each parameter's ``K`` rows into ``G``
as soon as they exist (:func:`gradfn.autodiff.gramian`); the aggregator's ``weighting`` maps
``G`` to ``w``; one more backward of ``Σ_k w_k L_k`` on the retained graph writes
``.grad = wᵀ J`` (Quinton & Rey 2024, arXiv:2406.16232, Section 6). The ``K × n`` Jacobian never
exists: peak memory is the parameters' gradient (one copy) plus ``K`` rows of the parameters in
flight plus ``K`` cotangents of the activations, where the row path holds ``K × n``.

``gramian="auto"`` picks this path when the rows would exceed a memory budget
(:func:`choose_gramian`).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from gradfn.aggregators._base import Aggregated, Aggregator
from gradfn.autodiff._gramian import stream_gramian

__all__ = [
    "GRAMIAN_PATHS",
    "check_memory_budget",
    "choose_gramian",
    "over_budget",
    "rows_bytes",
    "streaming_backward",
]

GRAMIAN_PATHS = ("auto", "rows", "streaming")


def rows_bytes(k: int, tensors: list[Tensor]) -> int:
    """Bytes of the ``K × n`` rows the row path allocates for ``tensors``."""
    return k * sum(t.numel() * t.element_size() for t in tensors)


def _budget(memory_budget: int | None, device: torch.device) -> int | None:
    if memory_budget is not None:
        return memory_budget
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return None  # the CPU: no estimate of what is free, the rows are used


def check_memory_budget(what: str, memory_budget: object) -> None:
    """``ValueError`` (naming ``what``) unless ``memory_budget`` is None or a positive int."""
    if isinstance(memory_budget, bool) or not (
        memory_budget is None or (isinstance(memory_budget, int) and memory_budget > 0)
    ):
        raise ValueError(f"{what}: `memory_budget` must be a positive int, got {memory_budget!r}")


def over_budget(k: int, tensors: list[Tensor], memory_budget: int | None) -> tuple[int, int] | None:
    """``(need, budget)`` in bytes when the ``K × n`` rows of ``tensors`` exceed
    ``memory_budget`` (default: the free memory of a CUDA device, none on the CPU), else None."""
    need = rows_bytes(k, tensors)
    budget = _budget(memory_budget, tensors[0].device)
    return None if budget is None or need <= budget else (need, budget)


def choose_gramian(
    gramian: str,
    memory_budget: int | None,
    agg: Aggregator,
    *,
    k: int,
    shared: list[Tensor],
    features: bool,
    strategy: str,
) -> str:
    """``"rows"`` or ``"streaming"``; errors for a streaming request that cannot be served.

    The rule for ``"auto"``: streaming when the rows (``K × n`` of the shared parameters' dtype)
    exceed ``memory_budget`` bytes (default: the free memory of a CUDA device, none on the CPU),
    the aggregator is a weighting of the Gramian, and ``features=`` is not used; a warning says
    so.
    """
    check_memory_budget("backward", memory_budget)
    if gramian == "rows":
        return "rows"
    leaves = all(t.grad_fn is None for t in shared)
    able = agg.weighting is not None and not features and strategy != "loop" and leaves
    if gramian == "streaming":
        if agg.weighting is None:
            raise ValueError(
                f"backward: gramian='streaming' needs an aggregator that is a weighting of the "
                f"Gramian; {agg.name!r} needs the per-task rows (use gramian='rows')"
            )
        if features:
            raise ValueError(
                "backward: gramian='streaming' does not take `features=`; pass the trunk as "
                "`shared=` instead"
            )
        if strategy == "loop":
            raise ValueError(
                "backward: gramian='streaming' runs one batched backward; `strategy` must be "
                "'auto' or 'vmap', got 'loop'"
            )
        return "streaming"
    over = over_budget(k, shared, memory_budget) if able else None
    if over is None:
        return "rows"
    need, budget = over
    warnings.warn(
        f"backward: the {k} per-task rows need {need / 2**20:.1f} MiB, over the memory budget "
        f"({budget / 2**20:.1f} MiB): the Gramian is computed leaf by leaf "
        "(gramian='streaming'); pass gramian='rows' or 'streaming' to choose",
        stacklevel=3,
    )
    return "streaming"


def streaming_backward(
    losses: list[Tensor],
    named: dict[str, Tensor],
    shared_names: list[str],
    head_names: list[str],
    agg: Aggregator,
    state: object,
) -> tuple[object, Aggregated]:
    """The body of ``backward(..., gramian="streaming")``: ``(state, Aggregated)``.

    Heads (trunk-only mode) get ``Σ_k ∂L_k/∂θ`` summed in the same batched backward.
    """
    shared = [named[n] for n in shared_names]
    heads = [named[n] for n in head_names]
    live = [i for i, loss in enumerate(losses) if loss.requires_grad]
    try:
        with torch.enable_grad():
            out = stream_gramian(losses, shared, heads, retain_graph=True)
    except RuntimeError as err:
        raise RuntimeError(
            "backward: the batched backward of gramian='streaming' failed, e.g. an op without a "
            f"batching rule; pass gramian='rows', strategy='loop'. ({err})"
        ) from err
    gram = out.gram
    bad = [
        n
        for n, p in zip(shared_names, out.parts, strict=True)
        if p is not None and not bool(torch.isfinite(p).all())
    ]
    bad += [
        n
        for n, s in zip(head_names, out.sums, strict=True)
        if s is not None and not bool(torch.isfinite(s).all())
    ]
    if bad or not bool(torch.isfinite(gram).all()):
        if not bad:
            raise ValueError("backward: non-finite Gramian (the per-task gradients overflow)")
        raise ValueError(f"backward: non-finite per-task gradient for {bad}")
    if state is None:
        state = agg.init(len(losses), device=gram.device)
    assert agg.weighting is not None  # checked by choose_gramian
    state, w = agg.weighting(state, gram)
    reached = [n for n, r in zip(shared_names, out.reached, strict=True) if r]
    grads: dict[str, Tensor] = {}
    if reached and live:
        weighted = w[live[0]].to(losses[live[0]].dtype) * losses[live[0]]
        for i in live[1:]:
            weighted = weighted + w[i].to(losses[i].dtype) * losses[i]
        got = torch.autograd.grad(weighted, [named[n] for n in reached], allow_unused=True)
        grads = {
            n: torch.zeros_like(named[n]) if g is None else g
            for n, g in zip(reached, got, strict=True)
        }
    full = {n: grads[n] if n in grads else torch.zeros_like(named[n]) for n in shared_names}
    with torch.no_grad():
        for n in reached:
            _accumulate(named[n], full[n])
        for p, s in zip(heads, out.sums, strict=True):
            if s is not None:
                _accumulate(p, s)
    return state, Aggregated(full, w)


def _accumulate(p: Tensor, g: Tensor) -> None:
    g = g.to(p.dtype)
    if p.grad is None:
        p.grad = g
    else:
        p.grad.add_(g)
