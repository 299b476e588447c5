"""Argument checks shared by the transforms: each error names the argument and what was expected."""

from __future__ import annotations

from typing import Any

__all__ = ["check_float", "check_int"]


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` if it is an integer (not a bool) ``≥ minimum``, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer ≥ {minimum}, got {value!r}")
    return value


def check_float(name: str, value: Any, low: float, high: float, *, open_high: bool = True) -> float:
    """``float(value)`` if it is a number in ``[low, high)`` (``[low, high]`` with
    ``open_high=False``), else ``ValueError`` naming ``name``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and low <= value and (value < high if open_high else value <= high)
    if not ok:
        bracket = ")" if open_high else "]"
        raise ValueError(f"`{name}` must be a number in [{low}, {high}{bracket}, got {value!r}")
    return float(value)
