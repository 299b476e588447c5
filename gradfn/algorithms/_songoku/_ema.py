"""SON-GOKU's per-task gradient EMAs ``e_k ← β e_k + (1−β) g_k`` (zero start), dense or sketched."""

from __future__ import annotations

import optree
import torch
from torch import Tensor

from gradfn._internal.compat import is_compiling
from gradfn.algorithms._songoku._config import SonGokuConfig
from gradfn.conflict import sketch
from gradfn.typing import Params, PyTree

__all__ = ["blend_rows", "ema_dtype", "ema_like", "finite_rows", "observe"]


def ema_dtype(x: Tensor) -> torch.dtype:
    """The EMA keeps float64 gradients in float64, everything else in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def ema_like(config: SonGokuConfig, params: Params, names: list[str]) -> PyTree:
    """Zero EMAs: ``{name: (K, *shape)}`` for the shared ``names``, or ``(K, d_sk)`` sketched."""
    k = config.num_tasks
    dev = params[names[0]].device
    if config.sketch_dim is not None:
        return torch.zeros(k, config.sketch_dim, dtype=torch.float32, device=dev)
    return {
        n: torch.zeros((k, *params[n].shape), dtype=ema_dtype(params[n]), device=dev) for n in names
    }


def observe(config: SonGokuConfig, shared_rows: dict[str, Tensor]) -> PyTree:
    """What the EMA averages: the shared gradients (rows), or their sketch."""
    if config.sketch_dim is not None:
        return sketch(shared_rows, config.sketch_dim, config.seed)
    return {n: g.to(ema_dtype(g)) for n, g in shared_rows.items()}


def finite_rows(obs: PyTree) -> Tensor:
    """``(R,)`` bool: rows of the observation without a NaN or an infinity (one sum per leaf and
    row: a NaN or an infinity makes the row's total non-finite)."""
    sums = [leaf.flatten(1).sum(dim=1) for leaf in optree.tree_leaves(obs)]
    return torch.isfinite(torch.stack(sums).sum(dim=0))


def blend_rows(
    ema: PyTree, obs: PyTree, idx: Tensor, mask: Tensor, beta: float, *, donate: bool
) -> PyTree:
    """``e_i ← β e_i + (1−β) o_i`` for the rows ``idx`` where ``mask`` (R,) holds.

    ``donate`` (eager only): write into ``ema`` in place (reads the row mask on the host) instead
    of building a new EMA.
    """
    if donate and not is_compiling():
        return _blend_rows_inplace(ema, obs, idx, mask, beta)

    def one(e: Tensor, o: Tensor) -> Tensor:
        old = e.index_select(0, idx)
        m = mask.reshape((-1,) + (1,) * (e.dim() - 1))
        new = torch.where(m, beta * old + (1.0 - beta) * o.to(e.dtype), old)
        return e.index_copy(0, idx, new)

    return optree.tree_map(one, ema, obs)


def _blend_rows_inplace(ema: PyTree, obs: PyTree, idx: Tensor, mask: Tensor, beta: float) -> PyTree:
    """In place, row by row on views of large leaves (no gathered copies of the EMA rows); small
    leaves take one gather, lerp and scatter each."""
    sel = torch.nonzero(mask).flatten()
    n_sel = int(sel.numel())
    if n_sel == 0:
        return ema
    rows = idx.index_select(0, sel)
    leaves = optree.tree_leaves(ema)
    k = leaves[0].shape[0]
    pairs: list[tuple[int, int]] | None = None
    if n_sel == k:
        rows_l = rows.tolist()
        every = rows_l == list(range(k)) and sel.tolist() == list(range(k))
    else:
        every = False
    for e, o in zip(leaves, optree.tree_leaves(obs), strict=True):
        o = o.to(e.dtype)
        if every:
            e.lerp_(o, 1.0 - beta)
        elif e[0].numel() >= _ROW_BY_ROW:
            if pairs is None:
                pairs = list(zip(rows.tolist(), sel.tolist(), strict=True))
            for r, s in pairs:
                e[r].lerp_(o[s], 1.0 - beta)
        else:
            new = torch.lerp(e.index_select(0, rows), o.index_select(0, sel), 1.0 - beta)
            e.index_copy_(0, rows, new)
    return ema


_ROW_BY_ROW = 4096  # elements per row above which a row-by-row update beats a gathered copy
