"""τ(t) schedules for the SON-GOKU conflict threshold (arXiv:2509.16959; layer 3 of gradfn).

With ``τ0 = tau_initial``, ``τ* = tau_target``, ``W = warmup_steps``, ``A = anneal_duration`` and
``p = min(1, (t − W) / max(1, A))``:

* ``t < W``: ``τ = τ0`` (the paper's warm-up: ``τ0 = 1`` ⇒ no edge can exist ⇒ joint training);
* ``A = 0``: ``τ = τ*`` after the warm-up;
* ``"linear"``: ``τ = τ0 + (τ* − τ0) p``;
* ``"cosine"``: ``τ = τ0 + (τ* − τ0)(1 − cos πp)/2``;
* ``"log"``: ``τ = τ0 (τ*/τ0)^p`` (geometric interpolation; needs ``τ0, τ* > 0``);
* ``"constant"``: ``τ = τ*`` for every ``t`` (the reference interpolates it like ``"log"``;
  here it is really constant, warm-up and anneal ignored).

:func:`tau_value` is pure and works on a Python number or a tensor ``t`` (tensor-only then).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from gradfn._internal.checks import is_number, plain_scalars

__all__ = ["TAU_KINDS", "TauSchedule", "tau_value"]

TauKind = Literal["log", "linear", "cosine", "constant"]
TAU_KINDS: tuple[str, ...] = ("log", "linear", "cosine", "constant")


@dataclass(frozen=True)
class TauSchedule:
    """The threshold schedule ``τ(t)``; the reference's ``TauSchedule`` (same fields, ``value``).

    ``τ`` values are interference thresholds and must lie in ``[−1, 1]`` (``ρ = −cos`` does);
    ``warmup_steps`` and ``anneal_duration`` are integers ``≥ 0``. The default is the reference's
    default: a constant 0.25 (``kind="log"`` without warm-up or anneal).
    """

    kind: TauKind = "log"
    tau_initial: float = 1.0
    tau_target: float = 0.25
    warmup_steps: int = 0
    anneal_duration: int = 0

    def __post_init__(self) -> None:
        plain_scalars(self)
        if self.kind not in TAU_KINDS:
            raise ValueError(f"TauSchedule: `kind` must be one of {TAU_KINDS}, got {self.kind!r}")
        for name in ("tau_initial", "tau_target"):
            value = getattr(self, name)
            if not is_number(value):
                raise TypeError(f"TauSchedule: `{name}` must be a number, got {value!r}")
            if not math.isfinite(value) or not (-1.0 <= value <= 1.0):
                raise ValueError(
                    f"TauSchedule: `{name}` must be a finite threshold in [-1, 1] "
                    f"(interference ρ = −cos lies there), got {value}"
                )
        for name in ("warmup_steps", "anneal_duration"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TauSchedule: `{name}` must be an integer ≥ 0, got {value!r}")
        if (
            self.kind == "log"
            and self.anneal_duration > 0
            and (self.tau_initial <= 0 or self.tau_target <= 0)
        ):
            raise ValueError(
                "TauSchedule: kind='log' interpolates geometrically and needs tau_initial > 0 and "
                f"tau_target > 0 (got {self.tau_initial}, {self.tau_target}); use kind='linear' "
                "or 'cosine' for thresholds ≤ 0"
            )

    def value(self, t: int | float | Tensor) -> float | Tensor:
        """``τ(t)`` (a float for a Python ``t``, a 0-d tensor for a tensor ``t``)."""
        return tau_value(self, t)


def _check_schedule(schedule: TauSchedule) -> None:
    if not isinstance(schedule, TauSchedule):
        raise TypeError(f"`schedule` must be a TauSchedule, got {type(schedule).__name__}")


def tau_value(
    schedule: TauSchedule, t: int | float | Tensor, *, dtype: torch.dtype = torch.float32
) -> float | Tensor:
    """``τ(t)`` of ``schedule`` (formulas in the module docstring); for a tensor ``t``, a 0-d
    tensor of ``dtype`` (computed in float64, then cast)."""
    _check_schedule(schedule)
    s = schedule
    t0, t1, w, a = s.tau_initial, s.tau_target, s.warmup_steps, s.anneal_duration
    if not isinstance(t, Tensor):
        if s.kind == "constant":
            return float(t1)
        if t < w:
            return float(t0)
        if a <= 0:
            return float(t1)
        p = min(1.0, (t - w) / max(1, a))
        if s.kind == "linear":
            return t0 + (t1 - t0) * p
        if s.kind == "cosine":
            return t0 + (t1 - t0) * (1.0 - math.cos(math.pi * p)) / 2.0
        return t0 * (t1 / t0) ** p

    tt = t.to(torch.float64)
    const = torch.full_like(tt, t1)
    if s.kind == "constant":
        return const.to(dtype)
    if a <= 0:
        out = torch.where(tt < w, torch.full_like(tt, t0), const)
        return out.to(dtype)
    frac: Tensor = ((tt - w) / max(1, a)).clamp(max=1.0)
    ann: Tensor
    if s.kind == "linear":
        ann = t0 + (t1 - t0) * frac
    elif s.kind == "cosine":
        ann = t0 + (t1 - t0) * (1.0 - torch.cos(math.pi * frac)) / 2.0
    else:
        ann = t0 * torch.pow(torch.full_like(tt, t1 / t0), frac)
    return torch.where(tt < w, torch.full_like(tt, t0), ann).to(dtype)
