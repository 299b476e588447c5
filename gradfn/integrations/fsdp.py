"""Per-task gradients on parameters sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

``torch.autograd.grad`` with respect to a sharded parameter does not see FSDP's all-gather (the
unsharded parameter is what the graph uses), so gradfn's engine cannot differentiate a sharded
model. :func:`per_task_backward` uses FSDP's own machinery instead: ``K`` ordinary backward passes
``L_k.backward(retain_graph=True)``, each of which FSDP all-gathers the parameters for and
reduce-scatters into the sharded ``p.grad`` (a ``DTensor``, averaged over the ranks). Each rank
keeps its local shard of the ``K`` rows (``K × n/W``), forms the partial Gramian
``G_r = J_r J_rᵀ`` (``K × K``) and one all-reduce gives ``G = Σ_r G_r = J Jᵀ`` on every rank
(bit-identical), so the aggregator's weights ``w = W(G)`` are the same everywhere. The update
``wᵀ J_r`` is the rank's shard of ``wᵀ J`` and is written to ``p.grad`` with no further
communication (Jacobian descent, Quinton & Rey 2024, arXiv:2406.16232).

Communication per step: ``K`` backward passes, each one all-gather and one reduce-scatter per
FSDP unit (the single-task step has one of each), plus one all-reduce of ``K²`` floats.

:func:`songoku_backward` and :func:`conductor_backward` run SON-GOKU and GradientConductor the
same way (their own module, ``gradfn.integrations._fsdp_algorithms``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradfn import tree
from gradfn.aggregators._backward_inputs import Losses, loss_list, resolve
from gradfn.aggregators._base import Aggregated, Aggregator

__all__ = ["conductor_backward", "per_task_backward", "songoku_backward"]


def _is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _group(params: dict[str, Tensor], where: str = "per_task_backward") -> Any:
    """The process group of the sharded parameters (``None``: none is sharded); ``where``
    names the caller in the errors."""
    from torch.distributed.tensor import Shard

    groups = []
    for name, p in params.items():
        if not _is_dtensor(p):
            continue
        mesh, placements = p.device_mesh, p.placements  # type: ignore[attr-defined]
        if mesh.ndim != 1 or not all(isinstance(pl, Shard) for pl in placements):
            raise ValueError(
                f"{where}: parameter {name!r} is placed as {placements} on a "
                f"{mesh.ndim}-D mesh; only fully_shard on a 1-D mesh (Shard(0)) is supported"
            )
        groups.append(mesh.get_group())
    plain = [n for n, p in params.items() if not _is_dtensor(p)]
    if groups and plain and dist.get_world_size(groups[0]) > 1:
        raise ValueError(
            f"{where}: parameters {plain[:3]} are not sharded by fully_shard; call "
            "fully_shard on the root module so that every parameter is"
        )
    return groups[0] if groups else None


def _fsdp_modules(model: nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _reshard(model: nn.Module) -> None:
    """Register the sharded parameters (the root keeps its unsharded ones after forward by
    default; its next backward all-gathers them again)."""
    if not any(not _is_dtensor(p) for p in model.parameters()):
        return
    for module in _fsdp_modules(model):
        module.reshard()


def _named(model: Any, where: str) -> dict[str, Tensor]:
    """The trainable parameters by name: of an ``nn.Module`` (resharded first) or a mapping."""
    if isinstance(model, nn.Module):
        _reshard(model)
        named: dict[str, Tensor] = {n: p for n, p in model.named_parameters() if p.requires_grad}
    elif isinstance(model, Mapping):
        named = dict(model)
    else:
        raise TypeError(
            f"{where}: `model` must be an nn.Module or a mapping, got {type(model).__name__}"
        )
    if not named:
        raise ValueError(f"{where}: `model` has no trainable parameter")
    return named


def _local(g: Tensor | None) -> Tensor | None:
    if g is None:
        return None
    return g.to_local() if _is_dtensor(g) else g  # type: ignore[attr-defined]


def _as_grad(p: Tensor, local: Tensor) -> Tensor:
    """``local`` (this rank's shard) as a gradient for ``p`` (a ``DTensor`` when ``p`` is)."""
    if not _is_dtensor(p):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local,
        p.device_mesh,  # type: ignore[attr-defined]
        p.placements,  # type: ignore[attr-defined]
        run_check=False,
        shape=p.shape,
        stride=p.stride(),
    )


def per_task_backward(
    losses: Losses,
    model: nn.Module | Mapping[str, Tensor],
    agg: Aggregator | str | Callable[..., Aggregated],
    *,
    state: Any = None,
    all_reduce: bool = True,
    keep_unsharded: bool = False,
    **hparams: Any,
) -> tuple[Any, Aggregated]:
    """Aggregate ``K`` task losses of an FSDP2 model; ``p.grad += wᵀ J`` (sharded ``DTensor``).

    Args:
        losses: ``K`` scalar losses of one forward (mean-reduced over the rank's batch: with equal
            per-rank batches the result equals one process on the union of the batches).
        model: the ``fully_shard``-ed module (its trainable parameters) or a name → parameter
            mapping. Without a process group (or unsharded parameters on one rank) it is the
            plain ``K``-backward row path.
        agg: an aggregator with a ``weighting`` of the Gramian (UPGrad, MGDA, DualProj, IMTL-G,
            Aligned-MTL, Nash-MTL, CAGrad, mean, ...), a method name (with ``**hparams``).
        state: the aggregator's state from the previous call (``None``: ``agg.init(K)``).
        all_reduce: sum the ranks' partial Gramians (``K × K``). ``False`` gives each rank's
            weights from its own shard only (wrong and rank-dependent; for tests and ablations).
        keep_unsharded: keep the parameters unsharded between the ``K`` backward passes
            (``set_reshard_after_backward(False)`` for all but the last, which reshards): one
            all-gather per FSDP unit instead of ``K``, at the price of holding every unsharded
            parameter until the last task's backward.

    Returns:
        ``(state, Aggregated)``; ``Aggregated.grad`` maps names to the rank's new ``p.grad``,
        ``Aggregated.weights`` is ``w`` (``(K,)``, identical on every rank).
    """
    items = loss_list(losses)
    aggregator = resolve(agg, hparams)
    if aggregator.weighting is None:
        raise ValueError(
            f"per_task_backward: {aggregator.name!r} needs the full per-task rows; on FSDP only "
            "aggregators that are a weighting of the Gramian are supported"
        )
    for flag, value in (("all_reduce", all_reduce), ("keep_unsharded", keep_unsharded)):
        if not isinstance(value, bool):
            raise TypeError(f"per_task_backward: `{flag}` must be a bool, got {value!r}")
    named = _named(model, "per_task_backward")
    group = _group(named)
    params = list(named.values())
    prior = [p.grad for p in params]
    fsdp = _fsdp_modules(model) if keep_unsharded and isinstance(model, nn.Module) else []
    rows = _rows(items, params, fsdp)
    for p, g in zip(params, prior, strict=True):
        p.grad = g
    return _aggregate(named, rows, aggregator, state, group, all_reduce, prior)


def _rows(
    items: Sequence[Tensor],
    params: list[Tensor],
    fsdp: list[Any],
    reached: dict[int, list[bool]] | None = None,
) -> Tensor:
    """``(K, n_r)``: row ``k`` is this rank's shard of ``∂L_k/∂θ`` (FSDP reduce-scatters it).

    ``fsdp``: the FSDP modules kept unsharded between the passes (empty: FSDP's own setting).
    ``reached[k]`` (filled when given): which parameters loss ``k``'s backward reached (FSDP
    leaves an unreached parameter's ``p.grad`` None, alike on every rank)."""
    locals_ = [_local(p) for p in params]
    n = sum(t.numel() for t in locals_ if t is not None)
    dtype = torch.promote_types(params[0].dtype, torch.float32)
    out = torch.zeros((len(items), n), dtype=dtype, device=params[0].device)
    live = [i for i, loss in enumerate(items) if loss.requires_grad]
    for i in live:
        for p in params:
            p.grad = None
        for module in fsdp:
            module.set_reshard_after_backward(i == live[-1], recurse=False)
        items[i].backward(retain_graph=i != live[-1])
        offset = 0
        if reached is not None:
            reached[i] = [p.grad is not None for p in params]
        for p, t in zip(params, locals_, strict=True):
            assert t is not None
            g = _local(p.grad)
            if g is not None:
                out[i, offset : offset + t.numel()] = g.reshape(-1).to(dtype)
            offset += t.numel()
    return out


def _aggregate(
    named: dict[str, Tensor],
    rows: Tensor,
    agg: Aggregator,
    state: Any,
    group: Any,
    all_reduce: bool,
    prior: list[Tensor | None],
) -> tuple[Any, Aggregated]:
    gram_dtype = tree.gram_dtype(rows)
    local = rows.to(gram_dtype)
    gram = local @ local.T
    if group is not None and all_reduce and dist.get_world_size(group) > 1:
        dist.all_reduce(gram, op=dist.ReduceOp.SUM, group=group)
    if not bool(torch.isfinite(gram).all()):
        raise ValueError("per_task_backward: non-finite Gramian (the per-task gradients overflow)")
    if state is None:
        state = agg.init(rows.shape[0], device=gram.device)
    assert agg.weighting is not None
    state, w = agg.weighting(state, gram)
    update = w.to(rows.dtype) @ rows
    out: dict[str, Tensor] = {}
    offset = 0
    with torch.no_grad():
        for (name, p), before in zip(named.items(), prior, strict=True):
            shard = _local(p)
            assert shard is not None
            part = update[offset : offset + shard.numel()].view(shard.shape).to(p.dtype)
            offset += shard.numel()
            if before is not None:
                part = part + _local(before)  # type: ignore[operator]
            p.grad = _as_grad(p, part)
            out[name] = p.grad
    return state, Aggregated(out, w)


# after the helpers above, which the algorithms' module imports
from gradfn.integrations._fsdp_algorithms import conductor_backward, songoku_backward  # noqa: E402
