"""The inputs of :func:`gradfn.aggregators.backward`, checked and normalised: the aggregator, the
losses (list, tuple, dict or ``(K,)`` tensor), the parameters, the shared ones, the features."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from gradfn._internal.sharded import reject_sharded
from gradfn.aggregators._base import Aggregated, Aggregator
from gradfn.aggregators._registry import aggregator as _build

__all__ = [
    "Losses",
    "Shared",
    "as_features",
    "loss_list",
    "named_params",
    "resolve",
    "shared_names",
]


Losses = Sequence[Tensor] | Tensor | Mapping[Any, Tensor]
Shared = Callable[[str], bool] | nn.Module | Iterable[Tensor]


def resolve(agg: Aggregator | str | Callable[..., Aggregated], hparams: dict) -> Aggregator:
    if isinstance(agg, Aggregator):
        if hparams:
            raise TypeError("hyper-parameters go to `aggregator(...)`, not to an Aggregator")
        return agg
    return _build(agg, **hparams)


def loss_list(losses: Losses) -> list[Tensor]:
    """The ``K`` task losses as 0-d tensors (a ``(K,)`` tensor, a sequence or a dict)."""
    if isinstance(losses, Tensor):
        if losses.dim() > 1:
            raise ValueError(
                "backward: `losses` as a tensor must be a (K,) vector of task losses (or 0-d for "
                f"one task), got shape {tuple(losses.shape)}: reduce each task's loss to a scalar "
                "first (e.g. `.mean(dim=1)` for per-sample losses)"
            )
        items = list(losses.reshape(-1).unbind(0))
        labels: list[Any] = list(range(len(items)))
    elif isinstance(losses, Mapping):
        items, labels = list(losses.values()), [repr(k) for k in losses]
    elif isinstance(losses, Sequence) and not isinstance(losses, str):
        items, labels = list(losses), list(range(len(losses)))
    else:
        raise TypeError(
            "backward: `losses` must be a sequence of scalar tensors, a (K,) tensor or a dict "
            f"of them, got {type(losses).__name__}"
        )
    if not items:
        raise ValueError("backward: `losses` is empty")
    for label, loss in zip(labels, items, strict=True):
        if not isinstance(loss, Tensor):
            raise TypeError(f"backward: `losses[{label}]` is a {type(loss).__name__}, not a Tensor")
        if loss.numel() != 1:
            raise ValueError(
                f"backward: `losses[{label}]` must be a scalar, got shape {tuple(loss.shape)}"
            )
        if not (loss.is_floating_point() or loss.is_complex()):
            raise TypeError(f"backward: `losses[{label}]` must be floating-point, got {loss.dtype}")
    return [loss.reshape(()) for loss in items]


def named_params(params: nn.Module | Mapping[str, Tensor] | Iterable[Tensor]) -> dict[str, Tensor]:
    named: dict[str, Tensor]
    if isinstance(params, nn.Module):
        named = {n: p for n, p in params.named_parameters() if p.requires_grad}
    elif isinstance(params, Mapping):
        named = {str(n): p for n, p in params.items() if p.requires_grad}
    elif isinstance(params, Iterable) and not isinstance(params, (Tensor, str)):
        named = {str(i): p for i, p in enumerate(params) if p.requires_grad}
    else:
        raise TypeError(
            "backward: `params` must be an nn.Module, a name → tensor mapping or an iterable of "
            f"tensors, got {type(params).__name__}"
        )
    if not named:
        raise ValueError("backward: `params` holds no tensor that requires grad")
    reject_sharded("backward", params if isinstance(params, nn.Module) else None, named.values())
    return named


def shared_names(shared: Shared, named: dict[str, Tensor]) -> list[str]:
    """The names in ``named`` that ``shared`` (predicate, module or tensors) selects."""
    if isinstance(shared, nn.Module):
        ids = {id(p) for p in shared.parameters()}
        picked = [n for n, p in named.items() if id(p) in ids]
    elif callable(shared):
        picked = [n for n in named if shared(n)]
    elif isinstance(shared, Iterable) and not isinstance(shared, (Tensor, str)):
        tensors = list(shared)
        if not all(isinstance(t, Tensor) for t in tensors):
            raise TypeError("backward: `shared` must hold tensors (the shared parameters)")
        by_id = {id(p): n for n, p in named.items()}
        stray = [i for i, t in enumerate(tensors) if id(t) not in by_id and t.requires_grad]
        if stray:
            raise ValueError(f"backward: `shared` entries {stray} are not among `params`")
        picked = [by_id[id(t)] for t in tensors if id(t) in by_id]
        picked = [n for n in named if n in set(picked)]  # in `params` order
    else:
        raise TypeError(
            "backward: `shared` must be a predicate on parameter names, an nn.Module or an "
            f"iterable of tensors, got {type(shared).__name__}"
        )
    if not picked:
        raise ValueError("backward: `shared` selects none of `params`")
    return picked


def as_features(features: Tensor | Sequence[Tensor]) -> list[Tensor]:
    feats = [features] if isinstance(features, Tensor) else list(features)
    if not feats or not all(isinstance(f, Tensor) and f.requires_grad for f in feats):
        raise ValueError(
            "backward: `features` must be one or more tensors that require grad (the shared "
            "representation the task heads read)"
        )
    return feats
