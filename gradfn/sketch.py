"""Seeded random projections of task-stacked gradients (SON-GOKU sketched EMA, spec §2.4).

``sketch(stacked, dim, seed)`` maps every task's shared gradient ``g_k ∈ R^n`` to
``s_k = P g_k ∈ R^dim`` with a random matrix ``P`` for which ``E[<Pa, Pb>] = <a, b>``. The EMA of
SON-GOKU then lives in ``K × dim`` memory instead of ``K × n``, and a refresh costs ``O(K² dim)``
for the Gramian (paper §2.4). Two matrices:

* ``method="countsketch"`` (default; Charikar et al. 2002, Clarkson & Woodruff 2013): each column
  of ``P`` has a single non-zero ``±1`` in a hashed row, so ``s_k[h(i)] += σ(i) g_k[i]``: an
  ``O(K·n)`` scatter-add, whatever ``dim``.
* ``method="rademacher"``: dense Johnson–Lindenstrauss entries ``±1/sqrt(dim)``: ``O(K·n·dim)``,
  lower variance per dimension, far slower for large ``n``.

``P`` is never stored: its entries are a counter-based hash of ``(seed, leaf, coordinate)``,
regenerated chunk by chunk, leaf by leaf. The same ``(seed, dim, method)`` always gives the same
``P``, chunking does not change the result, and everything is tensor-only integer arithmetic, so
it traces under ``torch.compile``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gradfn.tree import leaves, num_tasks

__all__ = ["SKETCH_METHODS", "count_sketch_hashes", "projection_block", "sketch"]

SKETCH_METHODS = ("countsketch", "rademacher")

PyTree = Any
_MASK = 0x7FFFFFFF  # 31 bits: every product below stays < 2**62 in int64.


def _mix(x: Tensor) -> Tensor:
    """A 31-bit integer hash (xorshift-multiply rounds); ``x`` int64 in ``[0, 2**31)``."""
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _MASK
    x = ((x ^ (x >> 12)) * 0x297A2D39) & _MASK
    x = ((x ^ (x >> 15)) * 0x1B873593) & _MASK
    return x ^ (x >> 16)


def _mix_int(x: int) -> int:
    """:func:`_mix` on a Python integer (same values)."""
    x &= _MASK
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _MASK
    x = ((x ^ (x >> 12)) * 0x297A2D39) & _MASK
    x = ((x ^ (x >> 15)) * 0x1B873593) & _MASK
    return x ^ (x >> 16)


def projection_block(
    seed: int, leaf: int, rows: Tensor, dim: int, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Rows ``rows`` (1-D int64) of leaf ``leaf``'s block of ``P``: ``(len(rows), dim)``.

    Entries are ``±1/sqrt(dim)``, a deterministic function of ``(seed, leaf, row, column)``.
    """
    device = rows.device
    base = _mix_int(_mix_int(int(seed)) ^ (int(leaf) * 0x9E3779B1))
    h_rows = _mix((rows.to(torch.int64) ^ base) & _MASK)  # (c,)
    cols = torch.arange(dim, dtype=torch.int64, device=device)
    h_cols = _mix((cols * 0x5BD1E995 + 0x632BE5AB) & _MASK)  # (dim,)
    # Rows and columns are hashed once each; an entry needs only two multiply-xorshift rounds.
    h = ((h_rows[:, None] ^ h_cols[None, :]) * 0x2C1B3C6D) & _MASK
    h = ((h ^ (h >> 13)) * 0x297A2D39) & _MASK
    scale = 1.0 / math.sqrt(dim)
    return torch.where((h & (1 << 17)) != 0, scale, -scale).to(dtype)


def count_sketch_hashes(seed: int, leaf: int, ids: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """CountSketch hashes of coordinates ``ids`` (1-D int64) of leaf ``leaf``.

    Returns ``(bucket, sign)``: ``bucket`` int64 in ``[0, dim)``, ``sign`` float32 ``±1``, so that
    column ``i`` of ``P`` is ``sign[i] · e_{bucket[i]}``.
    """
    base = _mix_int(_mix_int(int(seed) ^ 0x3C6EF372) ^ (int(leaf) * 0x9E3779B1))
    h = _mix((ids.to(torch.int64) ^ base) & _MASK)
    g = _mix((h * 0x5BD1E995 + 0x632BE5AB) & _MASK)  # second hash, independent bits for the sign
    bucket = h % dim
    sign = torch.where((g & (1 << 20)) != 0, 1.0, -1.0)
    return bucket, sign


def _project_chunk(
    method: str, seed: int, leaf: int, rows: Tensor, ids: Tensor, dim: int
) -> Tensor:
    """``(K, dim)`` projection of the columns ``ids`` of one leaf's rows (``rows``: ``K × c``)."""
    if method == "countsketch":
        bucket, sign = count_sketch_hashes(seed, leaf, ids, dim)
        out = torch.zeros(rows.shape[0], dim, dtype=rows.dtype, device=rows.device)
        return out.index_add(1, bucket, rows * sign.to(rows.dtype))
    return rows @ projection_block(seed, leaf, ids, dim, dtype=rows.dtype)


def sketch(
    stacked: PyTree,
    dim: int,
    seed: int = 0,
    *,
    chunk: int | None = None,
    method: str = "countsketch",
) -> Tensor:
    """Project a task-stacked pytree to ``(K, dim)`` float32: ``s_k = P g_k`` (module docstring).

    Leaves are visited in the pytree's canonical order; ``P`` is generated ``chunk`` coordinates
    at a time (default 65 536 for CountSketch, 8 192 for Rademacher), so the peak extra memory is
    ``K × chunk`` (CountSketch) or ``chunk × dim`` (Rademacher).
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"`dim` must be a positive integer, got {dim!r}")
    if method not in SKETCH_METHODS:
        raise ValueError(f"`method` must be one of {SKETCH_METHODS}, got {method!r}")
    if chunk is None:
        chunk = 65536 if method == "countsketch" else 8192
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"`chunk` must be a positive integer, got {chunk!r}")
    k = num_tasks(stacked)
    ls = leaves(stacked)
    out = torch.zeros(k, dim, dtype=torch.float32, device=ls[0].device)
    for index, leaf in enumerate(ls):
        rows = leaf.reshape(k, -1)
        n = rows.shape[1]
        acc = torch.float64 if leaf.dtype == torch.float64 else torch.float32
        part = torch.zeros(k, dim, dtype=acc, device=leaf.device)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            ids = torch.arange(start, stop, dtype=torch.int64, device=leaf.device)
            part = part + _project_chunk(method, seed, index, rows[:, start:stop].to(acc), ids, dim)
        out = out + part.to(torch.float32)
    return out
