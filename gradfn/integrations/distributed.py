"""torch.distributed helpers: averaging pytrees across ranks.

gradfn makes every decision (EMA inputs, Gramian, colouring, conflict resolution, arbitrator
history) from statistics averaged across ranks, so all ranks hold the same state at every step.
The statistic averaged is the task-stacked gradient itself (``K × n`` values, or ``K × d_sk`` with
a sketch): with mean-reduced losses and equal per-rank batches its average equals the gradient of
one process on the union of the ranks' batches, and so do the Gramian, the cosines and every
decision taken from them.

The reduction is bucketed: leaves are cast to ``float32`` (never reduced in half precision),
packed into flat buckets of at most ``bucket_bytes``, all-reduced with ``SUM``, divided by the
world size and cast back. With no initialised process group (or one rank) every function is the
identity, so single-process code needs no change.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import optree
import torch
import torch.distributed as dist
from torch import Tensor

from gradfn.typing import PyTree

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "all_reduce_mean",
    "broadcast_tree",
    "check_same_config",
    "is_distributed",
    "make_reducer",
    "sync_outputs",
    "world_size",
]

DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024


def is_distributed(group: Any = None) -> bool:
    """True when a process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group: Any = None) -> int:
    """Number of ranks of ``group`` (1 without an initialised process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _buckets(leaves: list[Tensor], bucket_bytes: int, itemsize: int) -> list[list[int]]:
    """Indices of ``leaves`` packed greedily into buckets of at most ``bucket_bytes``."""
    out: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, leaf in enumerate(leaves):
        nbytes = leaf.numel() * itemsize
        if current and size + nbytes > bucket_bytes:
            out.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
    if current:
        out.append(current)
    return out


def all_reduce_mean(
    tree: PyTree,
    *,
    group: Any = None,
    dtype: torch.dtype = torch.float32,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> PyTree:
    """The mean of ``tree`` over the ranks of ``group``: a new pytree, leaves in their own dtype.

    Floating leaves are reduced in ``dtype`` (``float32`` by default, or wider if the leaf is),
    in flat buckets of at most ``bucket_bytes``. Integer and boolean leaves are not allowed.
    Without an initialised process group, or with one rank, ``tree`` is returned unchanged.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    leaves, spec = optree.tree_flatten(tree)
    for leaf in leaves:
        if not isinstance(leaf, Tensor) or not leaf.is_floating_point():
            raise TypeError(
                "all_reduce_mean: every leaf must be a floating-point tensor, got "
                f"{leaf.dtype if isinstance(leaf, Tensor) else type(leaf).__name__}"
            )
    if not is_distributed(group) or not leaves:
        return tree
    n = world_size(group)
    out: list[Tensor | None] = [None] * len(leaves)
    itemsize = torch.empty((), dtype=dtype).element_size()
    for bucket in _buckets(leaves, bucket_bytes, itemsize):
        work = torch.promote_types(dtype, leaves[bucket[0]].dtype)
        for i in bucket:
            work = torch.promote_types(work, leaves[i].dtype)
        flat = torch.cat([leaves[i].reshape(-1).to(work) for i in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(n)
        offset = 0
        for i in bucket:
            leaf = leaves[i]
            out[i] = flat[offset : offset + leaf.numel()].view(leaf.shape).to(leaf.dtype)
            offset += leaf.numel()
    return optree.tree_unflatten(spec, out)


def broadcast_tree(tree: PyTree, *, src: int = 0, group: Any = None) -> PyTree:
    """``tree`` as held by rank ``src``, on every rank (a new pytree; identity without a group)."""
    leaves, spec = optree.tree_flatten(tree)
    if not is_distributed(group) or not leaves:
        return tree
    out = []
    for leaf in leaves:
        copy = leaf.detach().clone()
        dist.broadcast(copy, src=src, group=group)
        out.append(copy)
    return optree.tree_unflatten(spec, out)


def make_reducer(
    group: Any = None,
    *,
    dtype: torch.dtype = torch.float32,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> Callable[[PyTree], PyTree]:
    """A ``reduce(tree) -> tree`` averaging over ``group``: the hook the transforms accept."""

    def reduce(tree: PyTree) -> PyTree:
        return all_reduce_mean(tree, group=group, dtype=dtype, bucket_bytes=bucket_bytes)

    return reduce


def sync_outputs(
    grads: PyTree,
    skipped: Tensor,
    *,
    group: Any = None,
    combine: str = "mean",
) -> tuple[PyTree, Tensor]:
    """Per-rank results made common: the outputs averaged (``"mean"``) or summed (``"sum"``)
    across ranks in float32, and the skip flag OR-ed in the same all-reduce, so that a step
    skipped on one rank is skipped on every rank (no rank waits on a collective another skips).

    This is GCond's reference scheme (each rank resolves its own gradients, then the outputs are
    combined); identity without a process group.
    """
    if combine not in ("mean", "sum"):
        raise ValueError(f"`combine` must be 'mean' or 'sum', got {combine!r}")
    flag = skipped.to(torch.float32).reshape(())
    reduced = all_reduce_mean({"grads": grads, "flag": flag}, group=group)
    out = reduced["grads"]
    if combine == "sum":
        n = world_size(group)
        out = optree.tree_map(lambda g: g * n, out)
    return out, reduced["flag"] > 0


def _stable(value: Any) -> Any:
    """A rank-independent description of a setting: no object addresses (a callable is its
    qualified name, a dataclass its fields, a tensor its values when small)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _stable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Tensor):
        small = value.numel() <= 64
        return (tuple(value.shape), str(value.dtype), value.tolist() if small else None)
    if isinstance(value, (list, tuple)):
        return [_stable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(repr(_stable(v)) for v in value)
    if isinstance(value, Mapping):
        return {str(k): _stable(v) for k, v in value.items()}
    if callable(value) and not isinstance(value, type):
        name = getattr(value, "__qualname__", type(value).__qualname__)
        return f"{getattr(value, '__module__', '')}.{name}"
    return repr(value)


def check_same_config(fields: Mapping[str, Any], *, group: Any = None, what: str = "") -> None:
    """Check once, at start, that every rank was built with the same settings.

    Each field is hashed (SHA-256 of a rank-independent description: a callable counts by its
    qualified name), the digests are all-gathered, and any field whose digest differs between
    ranks raises a ``ValueError`` naming it on every rank, before a mismatch can pair unrelated
    collectives or average unrelated tasks. Without a process group of ≥ 2 ranks: nothing.
    """
    if not is_distributed(group):
        return
    mine = {
        str(k): hashlib.sha256(repr(_stable(v)).encode()).hexdigest()[:16]
        for k, v in fields.items()
    }
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    names = sorted(set().union(*(set(d) for d in gathered)))
    differ = [n for n in names if len({d.get(n) for d in gathered}) > 1]
    if differ:
        prefix = f"{what}: " if what else ""
        raise ValueError(
            f"{prefix}the ranks were built with different settings: {differ} differ between "
            "ranks (every rank must pass the same configuration, task names and ddp_sync)"
        )
