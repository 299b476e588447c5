"""``nn.Module`` to pure loss function: the bridge the adapters and ``nn.Module`` users cross."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module

from gradfn.typing import Params

__all__ = ["functional_loss", "split_module"]


def split_module(module: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(params, buffers)`` of ``module``.

    ``params``: the trainable parameters (``requires_grad=True``), detached (they share storage with
    the module, so an optimizer step on the module is seen through them). ``buffers``: the named
    buffers (BatchNorm statistics) plus the frozen parameters, which are held constant.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    params: dict[str, Tensor] = {}
    buffers: dict[str, Tensor] = dict(module.named_buffers())
    for name, p in module.named_parameters():
        if p.requires_grad:
            params[name] = p.detach()
        else:
            buffers[name] = p.detach()
    return params, buffers


def functional_loss(
    module: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Any],
    *,
    freeze_running_stats: bool = False,
) -> tuple[dict[str, Tensor], Callable[[Params, Any], Any]]:
    """Turn ``loss_fn(module, batch)`` into a pure ``f(params, batch)`` for the engine.

    Inside ``f`` the module's trainable parameters are replaced by ``params`` (any attribute access
    to the module sees them); frozen parameters and buffers stay the module's own. With
    ``freeze_running_stats=True`` the buffers are replaced by copies, so BatchNorm in train mode
    normalises with batch statistics but leaves the module's running statistics unchanged.

    Returns ``(params, f)`` with ``params`` from :func:`split_module`.
    """
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}")
    params, _ = split_module(module)
    if not params:
        raise ValueError("module has no trainable parameter (requires_grad=True)")

    def f(p: Params, batch: Any) -> Any:
        swap: dict[str, Tensor] = dict(p)
        if freeze_running_stats:
            for name, buf in module.named_buffers():
                swap[name] = buf.clone()
        with _reparametrize_module(module, swap):
            return loss_fn(module, batch)

    return params, f
