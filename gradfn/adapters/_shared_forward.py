"""One forward per distinct input: while the ``K`` task losses of a step are evaluated, a call of
the model (or of one of its direct submodules) with the same inputs as an earlier call returns that
call's output instead of running the forward again.

"The same inputs" means the same tensor objects (identity, not equal values) in the same positions,
equal plain values (numbers, strings, ``None``), the same grad mode and the same autocast state. So
tasks handed one batch object share one forward; tasks with their own batches never do. Sharing the
forward is what a shared-trunk model does in a plain loop: one dropout mask for every task, and
BatchNorm running statistics updated once per distinct input instead of once per task. Every
task reads the same output tensor, so a task loss must not modify it in place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["shared_forward"]

_MISSING = object()
_PLAIN = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device)


def _key(x: Any, pinned: list[Any]) -> Any:
    """A hashable key of a call argument; objects compared by identity are pinned (kept alive for
    the cache's lifetime, so their ``id`` cannot be reused)."""
    if isinstance(x, _PLAIN):
        return (type(x), x)
    if isinstance(x, (tuple, list)):
        return (type(x), tuple(_key(v, pinned) for v in x))
    if isinstance(x, dict):
        return (dict, tuple((_key(k, pinned), _key(v, pinned)) for k, v in x.items()))
    pinned.append(x)
    return ("id", id(x))


def _state_key() -> tuple[Any, ...]:
    """Grad mode and autocast state: a call under ``no_grad`` or another autocast dtype differs."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        autocast = tuple(
            (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")
        )
    else:  # pragma: no cover - older torch
        autocast = (
            (torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()),
            (torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()),
        )
    return (torch.is_grad_enabled(), autocast)


def _memoised(forward: Callable[..., Any], cache: dict[Any, Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        pinned: list[Any] = []
        key = (id(forward), _state_key(), _key(args, pinned), _key(kwargs, pinned))
        hit = cache.get(key)
        if hit is not None:
            return hit[0]
        out = forward(*args, **kwargs)
        cache[key] = (out, pinned)
        return out

    return call


def _modules(module: nn.Module) -> list[nn.Module]:
    """The model and its direct submodules (containers without a forward replaced by their
    children)."""
    out = [module]
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            out.extend(child.children())
        else:
            out.append(child)
    return out


@contextlib.contextmanager
def shared_forward(module: nn.Module) -> Iterator[None]:
    """Within the block, calls of ``module`` or of a direct submodule with the same inputs run the
    forward once (module docstring). The module is restored on exit."""
    cache: dict[Any, Any] = {}
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for m in _modules(module):
            own = m.__dict__.get("forward", _MISSING)
            patched.append((m, own))
            m.forward = _memoised(m.forward, cache)
        yield
    finally:
        for m, own in reversed(patched):
            if own is _MISSING:
                del m.forward
            else:
                m.forward = own
        cache.clear()
