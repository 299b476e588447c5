"""Refusing FSDP2-sharded models where only :mod:`gradfn.integrations.fsdp` handles them."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn


def is_sharded(model: nn.Module | None = None, tensors: Iterable[Tensor] = ()) -> bool:
    """Does ``model`` contain a ``fully_shard``-ed module, or is any of ``tensors`` a DTensor?"""
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build without torch.distributed
        return False
    if model is not None and any(isinstance(m, FSDPModule) for m in model.modules()):
        return True
    return any(isinstance(t, DTensor) for t in tensors)


def reject_sharded(
    where: str, model: nn.Module | None = None, tensors: Iterable[Tensor] = ()
) -> None:
    """``NotImplementedError`` naming the FSDP path when ``model`` / ``tensors`` are sharded."""
    if is_sharded(model, tensors):
        raise NotImplementedError(
            f"{where}: parameters sharded by FSDP2 (fully_shard) are not supported here; use "
            "gradfn.integrations.fsdp: per_task_backward(losses, model, aggregator) with an "
            "aggregator that is a weighting of the Gramian, songoku_backward(losses, model, "
            "config, state) for SON-GOKU or conductor_backward(microbatch_losses, model, config, "
            "state) for GradientConductor (see the FSDP section of the scaling docs)"
        )
