"""Refusing FSDP2-sharded models where only :mod:`gradfn.integrations.fsdp` handles them."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from torch import Tensor, nn


def is_sharded(model: nn.Module | None = None, tensors: Iterable[Tensor] = ()) -> bool:
    """Does ``model`` contain a ``fully_shard``-ed module, or is any of ``tensors`` a DTensor?

    Looks the classes up in ``sys.modules`` instead of importing them: a sharded model or a
    DTensor implies its module was imported already, and importing ``torch.distributed.tensor``
    into a plain gloo/DDP process makes its exit abort now and then (SIGABRT in gloo's teardown,
    torch 2.13), which a library must not cause in a user's process.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    dtensor = sys.modules.get("torch.distributed.tensor")
    fsdp_module = getattr(fsdp, "FSDPModule", None)
    dtensor_cls = getattr(dtensor, "DTensor", None)
    if (
        model is not None
        and fsdp_module is not None
        and any(isinstance(m, fsdp_module) for m in model.modules())
    ):
        return True
    return dtensor_cls is not None and any(isinstance(t, dtensor_cls) for t in tensors)


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
