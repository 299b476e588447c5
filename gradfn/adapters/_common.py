"""What both adapters share: unwrapping, distributed and AMP settings, writing ``p.grad``,
checkpoints as flat ``{path: tensor}`` dicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optree
import torch
from torch import Tensor, nn

from gradfn._internal.compat import TORCH_FLOORS, require_torch
from gradfn._internal.sharded import reject_sharded
from gradfn.integrations.amp import poison_like
from gradfn.integrations.distributed import is_distributed, make_reducer
from gradfn.typing import Reducer

__all__ = [
    "check_amp",
    "copy_tree",
    "from_plain",
    "loss_scale",
    "norm_buffers",
    "plain_state",
    "reducer",
    "restore_buffers",
    "trainable",
    "unwrap",
    "write_grads",
]


def unwrap(model: nn.Module, process_group: Any = None) -> tuple[nn.Module, bool, Any]:
    """``(module, is_ddp, process_group)``: a ``DistributedDataParallel`` / ``DataParallel``
    wrapper is unwrapped (the forward then runs through the module with substituted parameters, so
    DDP's own gradient hooks never fire); DDP's group is the default ``process_group``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    reject_sharded("SonGokuScheduler / GradientConductor", model)
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    if process_group is None and ddp:
        process_group = model.process_group
    parallel = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return (model.module if isinstance(model, parallel) else model), ddp, process_group


def reducer(ddp: bool, process_group: Any) -> Reducer | None:
    """An averaging reducer when the model is DDP-wrapped or a process group of ≥ 2 ranks is
    initialised, else None."""
    return make_reducer(process_group) if ddp or is_distributed(process_group) else None


def check_amp(autocast_dtype: Any, scaler: Any, owner: str) -> Any:
    """Validate the mixed-precision arguments of ``owner`` (the adapter's name); return the
    scaler if it is enabled, else None."""
    if autocast_dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(
            "`autocast_dtype` must be None, torch.bfloat16 or torch.float16, got "
            f"{autocast_dtype!r}"
        )
    if scaler is not None and not all(
        hasattr(scaler, a) for a in ("scale", "step", "update", "is_enabled")
    ):
        raise TypeError("`scaler` must be a torch.amp.GradScaler or None")
    if scaler is None or not scaler.is_enabled():
        return None
    require_torch(
        TORCH_FLOORS["scaler"],
        feature=f"{owner}(scaler=...)",
        hint="leave scaler=None (autocast_dtype= works without one)",
    )
    return scaler


def loss_scale(scaler: Any, device: torch.device) -> Tensor | None:
    """A 0-d tensor holding the scaler's current scale (it also initialises the scaler lazily)."""
    return None if scaler is None else scaler.scale(torch.ones((), device=device))


def trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs with ``requires_grad``, in ``named_parameters`` order."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("`model` has no trainable parameter")
    return named


def write_grads(
    named: Sequence[tuple[str, nn.Parameter]],
    grads: Mapping[str, Tensor],
    write: Sequence[bool],
    *,
    scale: Tensor | None = None,
    poison: bool = False,
) -> None:
    """``p.grad = g`` (× ``scale``, or ``+inf`` with ``poison`` so that ``GradScaler.step``
    skips and backs off) where ``write`` holds, ``None`` elsewhere."""
    for (name, p), hit in zip(named, write, strict=True):
        if not hit:
            p.grad = None
            continue
        g = grads[name].detach()
        if poison:
            g = poison_like(p)
        elif scale is not None:
            g = g.to(torch.promote_types(g.dtype, torch.float32)) * scale
        p.grad = g.to(p.dtype)


def norm_buffers(module: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """``(buffer, copy)`` for the running statistics of every normalisation layer (BatchNorm,
    InstanceNorm with ``track_running_stats``): what a forward in train mode changes in place.
    Other buffers are not copied."""
    norms = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
    return [
        (b, b.detach().clone())
        for m in module.modules()
        if isinstance(m, norms)
        for b in m.buffers(recurse=False)
    ]


def restore_buffers(saved: Sequence[tuple[Tensor, Tensor]]) -> None:
    """Write the copies of :func:`norm_buffers` back (a skipped step changes no statistic)."""
    with torch.no_grad():
        for buf, value in saved:
            buf.copy_(value)


def copy_tree(tree: Any) -> Any:
    """Detached copies of every tensor leaf (other leaves as they are)."""
    return optree.tree_map(lambda x: x.detach().clone() if isinstance(x, Tensor) else x, tree)


def plain_state(state: Any) -> Any:
    """A state as nested plain containers of tensor copies (a NamedTuple becomes a dict of its
    fields, a tuple a list), which ``torch.load(weights_only=True)`` reads back."""
    if isinstance(state, Tensor):
        return state.detach().clone()
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return {f: plain_state(getattr(state, f)) for f in state._fields}
    if isinstance(state, Mapping):
        return {k: plain_state(v) for k, v in state.items()}
    if isinstance(state, (tuple, list)):
        return [plain_state(v) for v in state]
    raise TypeError(f"state_dict: unexpected state entry of type {type(state).__name__}")


def from_plain(template: Any, plain: Any, what: str, path: str = "") -> Any:
    """The inverse of :func:`plain_state` into ``template``'s structure, devices and dtypes."""
    where = path or "the root"
    if isinstance(template, Tensor):
        if not isinstance(plain, Tensor):
            raise ValueError(f"load_state_dict: {what} entry {where} is not a tensor")
        if plain.shape != template.shape:
            raise ValueError(
                f"load_state_dict: {what} entry {where} has shape {tuple(plain.shape)}, "
                f"expected {tuple(template.shape)}"
            )
        return plain.to(device=template.device, dtype=template.dtype).clone()
    if isinstance(template, tuple) and hasattr(template, "_fields"):
        keys: Sequence[Any] = template._fields
    elif isinstance(template, Mapping):
        keys = list(template)
    else:
        keys = range(len(template))
    try:
        values = [from_plain(_at(template, k), plain[k], what, f"{path}/{k}") for k in keys]
    except (KeyError, IndexError, TypeError) as err:
        raise ValueError(f"load_state_dict: {what} entry missing under {where}: {err}") from None
    if isinstance(template, tuple) and hasattr(template, "_fields"):
        return type(template)(*values)
    if isinstance(template, Mapping):
        return dict(zip(keys, values, strict=True))
    return type(template)(values)


def _at(template: Any, key: Any) -> Any:
    return getattr(template, key) if hasattr(template, "_fields") else template[key]
