"""Greedy graph colouring and colour groups (SON-GOKU, arXiv:2509.16959).

* :func:`color` — Welsh–Powell largest-first colouring (paper §3, reference
  ``welsh_powell_coloring``): vertices by degree descending, ties by ascending task index, first
  fit (lowest colour no neighbour has). At most ``Δ + 1`` colours.
* :func:`groups_from_colors` — the colour classes as a fixed-shape ``(K, K)`` boolean mask
  (row ``c`` = members of colour ``c``) plus the number of valid rows.
* :func:`duplicate_min_coverage` — minimum-coverage duplication of the paper's §4.4, as the
  reference implementation does it.

All three are tensor-only with loops of a fixed length (``K`` positions), so they run without host
syncs and trace under ``torch.compile``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["color", "duplicate_min_coverage", "groups_from_colors", "welsh_powell_order"]


def _check_adjacency(adjacency: Tensor) -> int:
    if not isinstance(adjacency, Tensor):
        raise TypeError(f"`adjacency` must be a Tensor, got {type(adjacency).__name__}")
    if adjacency.dim() != 2 or adjacency.shape[0] != adjacency.shape[1]:
        raise ValueError(
            f"`adjacency` must be a square K×K matrix, got shape {tuple(adjacency.shape)}"
        )
    if adjacency.shape[0] == 0:
        raise ValueError("`adjacency` is empty (K = 0)")
    return int(adjacency.shape[0])


def _as_graph(adjacency: Tensor) -> Tensor:
    """Boolean, symmetric, hollow version of ``adjacency``."""
    k = adjacency.shape[0]
    adj = adjacency.to(torch.bool)
    adj = adj | adj.T
    return adj & ~torch.eye(k, dtype=torch.bool, device=adj.device)


def welsh_powell_order(adjacency: Tensor) -> Tensor:
    """Vertex order of Welsh–Powell: degree descending, ties by ascending index. ``(K,)`` int64."""
    _check_adjacency(adjacency)
    degree = _as_graph(adjacency).sum(dim=1)
    return torch.sort(-degree, stable=True).indices


def color(adjacency: Tensor) -> Tensor:
    """Welsh–Powell largest-first greedy colouring. Returns colours ``(K,)`` int64 in ``[0, K)``.

    Vertices are visited by degree (descending, ties by index); each takes the lowest colour that
    none of its already-coloured neighbours has. Colours are therefore numbered in creation order
    and are contiguous ``0..m−1`` with ``m ≤ Δ + 1``. The graph is symmetrised and its diagonal
    ignored.
    """
    k = _check_adjacency(adjacency)
    adj = _as_graph(adjacency)
    order = welsh_powell_order(adj)
    device = adj.device
    colors = torch.full((k,), -1, dtype=torch.int64, device=device)
    sentinel = torch.full((k,), k, dtype=torch.int64, device=device)
    for pos in range(k):
        v = order[pos : pos + 1]  # (1,)
        nbr = adj.index_select(0, v).squeeze(0) & (colors >= 0)
        taken = torch.zeros(k + 1, dtype=torch.bool, device=device)
        taken = taken.scatter(0, torch.where(nbr, colors, sentinel), nbr)
        first_free = torch.argmax((~taken[:k]).to(torch.int64)).reshape(1)
        colors = colors.scatter(0, v, first_free)
    return colors


def groups_from_colors(colors: Tensor) -> tuple[Tensor, Tensor]:
    """Colour classes as a mask. Returns ``(groups, num_groups)``.

    ``groups`` is ``(K, K)`` bool: ``groups[c, k]`` iff task ``k`` has colour ``c``; rows
    ``≥ num_groups`` are all False. ``num_groups`` is a 0-d int64 tensor (``max(colors) + 1``).
    Group ``c`` lists its members in ascending task order (the mask's column order).
    """
    if not isinstance(colors, Tensor) or colors.dim() != 1 or colors.shape[0] == 0:
        raise ValueError("`colors` must be a non-empty 1-D tensor (K,)")
    k = colors.shape[0]
    ids = torch.arange(k, dtype=colors.dtype, device=colors.device)
    groups = ids[:, None] == colors[None, :]
    return groups, (colors.max() + 1).to(torch.int64).clamp(min=1)


def duplicate_min_coverage(groups: Tensor, adjacency: Tensor, min_updates: int) -> Tensor:
    """Minimum-coverage duplication (paper §4.4). Returns the new ``(K, K)`` mask.

    Every task should appear in at least ``min_updates`` groups of the cycle. Tasks are visited in
    order of first appearance (group 0 members ascending, then group 1, ...); a task lacking
    appearances joins, in cycle order, groups that do not contain it and hold none of its
    conflict neighbours (members added earlier in this pass count). No group is created, so
    coverage is best effort. Empty rows (unused colours) are never filled.
    """
    k = _check_adjacency(adjacency)
    if groups.shape != (k, k):
        raise ValueError(f"`groups` must be a (K, K) mask with K={k}, got {tuple(groups.shape)}")
    if int(min_updates) < 1:
        raise ValueError(f"`min_updates` must be ≥ 1, got {min_updates}")
    groups = groups.to(torch.bool)
    if int(min_updates) == 1:
        return groups
    adj = _as_graph(adjacency)
    device = groups.device
    valid = groups.any(dim=1)  # (K,) rows in use
    ids = torch.arange(k, device=device)
    present = groups.any(dim=0)
    first = torch.argmax(groups.to(torch.int64), dim=0)  # first group containing each task
    key = torch.where(present, first, torch.full_like(first, k)) * k + ids
    order = torch.argsort(key)
    for pos in range(k):
        v = order[pos : pos + 1]
        member_v = groups.index_select(1, v).squeeze(1)  # (G,)
        need = int(min_updates) - member_v.to(torch.int64).sum()
        nbr = adj.index_select(0, v).squeeze(0)  # (K,)
        clash = (groups & nbr[None, :]).any(dim=1)
        eligible = valid & ~member_v & ~clash
        take = eligible & (torch.cumsum(eligible.to(torch.int64), 0) <= need)
        groups = groups.index_put((ids, v.expand(k)), take | member_v)
    return groups
