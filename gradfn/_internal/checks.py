"""Argument checks shared by every layer: each error names the argument and what was expected."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Collection
from typing import Any, TypeVar

import torch

__all__ = [
    "check_beta",
    "check_callable",
    "check_choice",
    "check_finite",
    "check_float",
    "check_int",
    "check_key",
    "check_nonnegative",
    "check_optional_int",
    "check_optional_nonnegative",
    "check_positive",
    "check_seed",
    "is_number",
    "plain_scalars",
]

T = TypeVar("T")


def is_number(value: Any) -> bool:
    """A real number: int, float or a numpy scalar of either (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not _is_bool(value)


def _is_bool(value: Any) -> bool:
    return type(value).__name__ == "bool_"  # numpy.bool_ without importing numpy


def plain_scalars(obj: Any) -> None:
    """Replace the numpy scalars among a frozen dataclass's fields by Python numbers (``.item()``),
    so ``np.float32(0.9)`` or ``np.int64(4)`` is accepted like ``0.9`` or ``4`` and stored plain."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if type(v).__module__ == "numpy" and getattr(v, "ndim", None) == 0:
            object.__setattr__(obj, f.name, v.item())


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` if it is an integer (not a bool) ``≥ minimum``, else ``ValueError`` naming ``name``."""
    integral = isinstance(value, numbers.Integral) and not _is_bool(value)
    if isinstance(value, bool) or not integral or value < minimum:
        raise ValueError(f"`{name}` must be an integer ≥ {minimum}, got {value!r}")
    return int(value)


def check_optional_int(name: str, value: Any, minimum: int) -> int | None:
    """:func:`check_int`, with ``None`` allowed."""
    return None if value is None else check_int(name, value, minimum)


def check_float(name: str, value: Any, low: float, high: float, *, open_high: bool = True) -> float:
    """``float(value)`` if it is a number in ``[low, high)`` (``[low, high]`` with
    ``open_high=False``), else ``ValueError`` naming ``name``."""
    ok = (
        is_number(value)
        and math.isfinite(value)
        and low <= value
        and (value < high if open_high else value <= high)
    )
    if not ok:
        bracket = ")" if open_high else "]"
        raise ValueError(f"`{name}` must be a number in [{low}, {high}{bracket}, got {value!r}")
    return float(value)


def check_finite(name: str, value: Any) -> float:
    """``float(value)`` if it is a finite real number (not a bool), else ``ValueError``."""
    if not (is_number(value) and math.isfinite(value)):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}")
    return float(value)


def check_beta(name: str, value: Any) -> float:
    """An EMA factor: a number in ``[0, 1)``."""
    return check_float(name, value, 0.0, 1.0)


def check_positive(name: str, value: Any) -> float:
    """A finite number ``> 0``."""
    if not (is_number(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a number > 0, got {value!r}")
    return float(value)


def check_nonnegative(name: str, value: Any) -> float:
    """A finite number ``≥ 0`` (NaN is rejected)."""
    if not (is_number(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"`{name}` must be a number ≥ 0, got {value!r}")
    return float(value)


def check_optional_nonnegative(name: str, value: Any) -> float | None:
    """:func:`check_nonnegative`, with ``None`` allowed."""
    return None if value is None else check_nonnegative(name, value)


def check_choice(name: str, value: T, choices: Collection[Any]) -> T:
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them."""
    if isinstance(value, (list, dict, set)) or value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {value!r}")
    return value


def check_callable(name: str, value: Any, *, optional: bool = False) -> Callable[..., Any] | None:
    """``value`` if it is callable (or ``None`` with ``optional``), else ``TypeError``."""
    if value is None and optional:
        return None
    if not callable(value):
        what = "callable or None" if optional else "callable"
        raise TypeError(f"`{name}` must be {what}, got {type(value).__name__}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` must be a bool (not merely truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}")
    return value


def check_seed(name: str, value: Any) -> int:
    """An integer seed (``TypeError`` for a float, a bool, a string or None)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {value!r}")
    return int(value)


def check_key(name: str, value: Any) -> Any:
    """A random seed or key: an integer (a numpy one too, returned as a Python int; not a bool)
    or a one-element integer tensor (e.g. a key from ``fold_in``, returned as is); ``TypeError``
    naming ``name`` otherwise. Reads no tensor value (no host sync)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"`{name}` must be an int or an integer tensor, got {value.dtype}")
        if value.numel() != 1:
            raise ValueError(f"`{name}` must be one integer, got shape {tuple(value.shape)}")
        return value
    return check_seed(name, value)
