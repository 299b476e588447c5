"""Build an :class:`Aggregator` by name: ``aggregator("upgrad", reg_eps=1e-4)``."""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

from gradfn._internal.checks import check_key
from gradfn.aggregators._aligned_mtl import aligned_mtl
from gradfn.aggregators._base import Aggregated, Aggregator, seeded, stateless
from gradfn.aggregators._cagrad import cagrad
from gradfn.aggregators._config import config
from gradfn.aggregators._dualproj import dualproj
from gradfn.aggregators._fairgrad import fairgrad
from gradfn.aggregators._gcond import gcond
from gradfn.aggregators._graddrop import graddrop
from gradfn.aggregators._gradvac import gradvac
from gradfn.aggregators._imtl_g import imtl_g
from gradfn.aggregators._inverse_norm import inverse_norm
from gradfn.aggregators._mean import mean, sum_
from gradfn.aggregators._mgda import mgda
from gradfn.aggregators._nash_mtl import nash_mtl
from gradfn.aggregators._pcgrad import pcgrad
from gradfn.aggregators._upgrad import upgrad

__all__ = ["METHODS", "aggregator"]

_STATELESS: dict[str, Callable[..., Aggregated]] = {
    "mean": mean,
    "sum": sum_,
    "mgda": mgda,
    "upgrad": upgrad,
    "dualproj": dualproj,
    "cagrad": cagrad,
    "imtl_g": imtl_g,
    "aligned_mtl": aligned_mtl,
    "config": config,
    "gcond": gcond,
    "fairgrad": fairgrad,
}
_SEEDED: dict[str, Callable[..., Aggregated]] = {"pcgrad": pcgrad, "graddrop": graddrop}
_FACTORIES: dict[str, Callable[..., Aggregator]] = {
    "gradvac": gradvac,
    "nash_mtl": nash_mtl,
    "inverse_norm": inverse_norm,
}

METHODS: tuple[str, ...] = (*_STATELESS, *_SEEDED, *_FACTORIES)


def aggregator(method: str | Callable[..., Aggregated], **hparams: Any) -> Aggregator:
    """The :class:`Aggregator` of ``method`` with its hyper-parameters bound.

    ``method``: a name in :data:`METHODS`, or any pure ``aggregate(grads, *, active=None,
    gram=None, **hparams) -> Aggregated``. ``"pcgrad"`` and ``"graddrop"`` take ``seed`` (default
    0) and draw fresh randomness each call from a counter in their state.
    """
    _check_finite(hparams)
    if callable(method):
        return stateless(method, getattr(method, "__name__", "aggregator"), **hparams)
    if not isinstance(method, str):
        raise TypeError(f"aggregator: `method` must be a name or a callable, got {type(method)}")
    if method in _STATELESS:
        _check_hparams(_STATELESS[method], method, hparams)
        return stateless(_STATELESS[method], method, **hparams)
    if method in _SEEDED:
        _check_hparams(_SEEDED[method], method, hparams)
        seed = check_key("seed", hparams.pop("seed", 0))
        return seeded(_SEEDED[method], method, seed, **hparams)
    if method in _FACTORIES:
        _check_hparams(_FACTORIES[method], method, hparams, skip=0)
        return _FACTORIES[method](**hparams)
    raise ValueError(f"aggregator: unknown method `method`={method!r}; expected one of {METHODS}")


def _check_finite(hparams: dict[str, Any]) -> None:
    """A NaN or infinite float hyper-parameter (or entry of a tuple of them) fails at build time:
    it would give NaN weights or silently switch a guard off."""
    for name, value in hparams.items():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if isinstance(v, numbers.Real) and not math.isfinite(v):
                raise ValueError(f"aggregator: `{name}` must be finite, got {value!r}")


def _check_hparams(
    aggregate: Callable[..., Any], method: str, hparams: dict, skip: int = 1
) -> None:
    """Unknown hyper-parameter names fail when the aggregator is built, not at its first use."""
    fn = getattr(aggregate, "weights_fn", aggregate)  # the Gramian weighting, if it is one
    params = list(inspect.signature(fn).parameters.values())[skip:]  # after grads / gram
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return  # it forwards keywords further: checked where they land
    allowed = {p.name for p in params}
    allowed -= {"active", "gram"}
    unknown = sorted(set(hparams) - allowed)
    if unknown:
        raise TypeError(
            f"aggregator: unknown hyper-parameter(s) {unknown} for `method`={method!r}; "
            f"it takes {sorted(allowed)}"
        )
