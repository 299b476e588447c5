"""Seeded random projections of task-stacked gradients: SON-GOKU's sketched EMA.

``sketch(stacked, dim, seed)`` maps every task's shared gradient ``g_k ∈ R^n`` to
``s_k = P g_k ∈ R^dim`` with a random matrix ``P`` for which ``E[<Pa, Pb>] = <a, b>``. The EMA of
SON-GOKU (arXiv:2509.16959) then lives in ``K × dim`` memory instead of ``K × n``, and a
recolouring costs ``O(K² dim)`` for the Gramian. Two matrices:

* ``method="countsketch"`` (default; Charikar et al. 2002, Clarkson & Woodruff 2013): each column
  of ``P`` has a single non-zero ``±1`` in a hashed row, so ``s_k[h(i)] += σ(i) g_k[i]``: an
  ``O(K·n)`` scatter-add, whatever ``dim``.
* ``method="rademacher"``: dense Johnson–Lindenstrauss entries ``±1/sqrt(dim)``: ``O(K·n·dim)``,
  lower variance per dimension, far slower for large ``n``.

``P`` is never stored: its entries are a counter-based hash (:mod:`gradfn._internal.prng`) of
``(seed, leaf, coordinate)``, regenerated chunk by chunk, leaf by leaf. The same
``(seed, dim, method)`` always gives the same ``P``, chunking does not change the result, and
everything is tensor-only integer arithmetic, so it traces under ``torch.compile``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from gradfn._internal.prng import as_key, fold_in, hash32, random_bits
from gradfn.autodiff._gramian import stream_gramian
from gradfn.tree import leaves, num_tasks
from gradfn.typing import PyTree

__all__ = [
    "SKETCH_METHODS",
    "count_sketch_hashes",
    "projection_block",
    "sketch",
    "sketch_leaf",
    "streamed_sketch",
]

SKETCH_METHODS = ("countsketch", "rademacher")

_ROW_SALT = 0x5BD1E995
_SIGN_SALT = 0x632BE5AB


def _leaf_key(seed: int, leaf: int, salt: int, device: torch.device) -> Tensor:
    return fold_in(fold_in(as_key(seed, device), leaf), salt)


def projection_block(
    seed: int, leaf: int, rows: Tensor, dim: int, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Rows ``rows`` (1-D int64) of leaf ``leaf``'s block of ``P``: ``(len(rows), dim)``.

    Entries are ``±1/sqrt(dim)``, a deterministic function of ``(seed, leaf, row, column)``.
    """
    device = rows.device
    h_rows = random_bits(_leaf_key(seed, leaf, 1, device), rows.to(torch.int64))  # (c,)
    cols = torch.arange(dim, dtype=torch.int64, device=device)
    h_cols = hash32(cols * _ROW_SALT + _SIGN_SALT)  # (dim,)
    # rows and columns are hashed once each; an entry needs one more hash of their combination
    h = hash32(h_rows[:, None] ^ h_cols[None, :])
    scale = 1.0 / math.sqrt(dim)
    return torch.where((h & (1 << 17)) != 0, scale, -scale).to(dtype)


def count_sketch_hashes(seed: int, leaf: int, ids: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """CountSketch hashes of coordinates ``ids`` (1-D int64) of leaf ``leaf``.

    Returns ``(bucket, sign)``: ``bucket`` int64 in ``[0, dim)``, ``sign`` float32 ``±1``, so that
    column ``i`` of ``P`` is ``sign[i] · e_{bucket[i]}``.
    """
    h = random_bits(_leaf_key(seed, leaf, 2, ids.device), ids.to(torch.int64))
    g = hash32(h * _ROW_SALT + _SIGN_SALT)  # a second hash: independent bits for the sign
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
    chunk = _check(dim, method, chunk)
    ls = leaves(stacked)
    k = num_tasks(stacked)
    out = torch.zeros(k, dim, dtype=torch.float32, device=ls[0].device)
    for index, leaf in enumerate(ls):
        out = out + sketch_leaf(leaf.reshape(k, -1), index, dim, seed, method, chunk)
    return out


def sketch_leaf(rows: Tensor, index: int, dim: int, seed: int, method: str, chunk: int) -> Tensor:
    """``(K, dim)`` float32: the projection of leaf ``index``'s rows (``K × n``), ``chunk``
    coordinates at a time (accumulated in float64 for float64 rows)."""
    k, n = rows.shape
    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
    part = torch.zeros(k, dim, dtype=acc, device=rows.device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        ids = torch.arange(start, stop, dtype=torch.int64, device=rows.device)
        part = part + _project_chunk(method, seed, index, rows[:, start:stop].to(acc), ids, dim)
    return part.to(torch.float32)


def _check(dim: int, method: str, chunk: int | None) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"`dim` must be a positive integer, got {dim!r}")
    if method not in SKETCH_METHODS:
        raise ValueError(f"`method` must be one of {SKETCH_METHODS}, got {method!r}")
    if chunk is None:
        chunk = 65536 if method == "countsketch" else 8192
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"`chunk` must be a positive integer, got {chunk!r}")
    return chunk


def streamed_sketch(
    losses: Sequence[Tensor],
    inputs: Sequence[Tensor],
    dim: int,
    seed: int = 0,
    *,
    chunk: int | None = None,
    method: str = "countsketch",
    retain_graph: bool = False,
    gramian: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``(sketches (K, dim), G (K, K))`` of ``K`` losses w.r.t. ``inputs`` without the rows.

    The projection is linear per leaf, so each leaf's ``K`` rows are projected (and folded into
    ``G``) while they exist, in the one batched backward of :func:`gradfn.autodiff.gramian`:
    equal to ``sketch(rows, dim, seed)`` for the rows of ``inputs`` in that order.
    ``gramian=False``: ``G`` is not computed (its ``K² n`` work is skipped) and returned as None.
    """
    chunk = _check(dim, method, chunk)
    box: list[Tensor] = []

    def also(index: int, rows: Tensor) -> None:
        s = sketch_leaf(rows.reshape(rows.shape[0], -1), index, dim, seed, method, chunk)
        box.append(s if not box else box.pop() + s)

    out = stream_gramian(
        list(losses), list(inputs), retain_graph=retain_graph, also=also, gram=gramian
    )
    k = len(losses)
    sk = box[0] if box else torch.zeros(k, dim, dtype=torch.float32, device=out.gram.device)
    return sk, out.gram if gramian else None
