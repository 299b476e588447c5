"""GradientConductor's hyper-parameters: one frozen dataclass that validates itself, and the one
place where the reference implementation's argument names are mapped to it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import Tensor

from gradfn._internal.checks import (
    check_beta,
    check_choice,
    check_int,
    check_optional_int,
    check_positive,
    is_number,
    plain_scalars,
)
from gradfn.conflict import DominanceRule, Rule, check_thresholds

__all__ = ["ConductorConfig", "reference_options"]

_ACCUMULATION_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def reference_options(eps: float = 1e-8) -> dict[str, Any]:
    """The :class:`ConductorConfig` fields that reproduce the reference implementation's defects
    (the GCond guide of the docs lists each one)."""
    eps = check_positive("eps", eps)
    return {
        "accumulation_dtype": torch.bfloat16,
        "stability_source": "processed",
        "min_cosine": "reference",
        "arbitrate_weak": True,
        "norm_floor": math.sqrt(eps),
        "cap_single_loss": False,
    }


def _lambdas(lambdas: Any) -> tuple[float, ...]:
    if isinstance(lambdas, Tensor):
        if lambdas.dim() != 1:
            raise ValueError(f"`lambdas` must be 1-D (K,), got shape {tuple(lambdas.shape)}")
        values = lambdas.tolist()
    elif isinstance(lambdas, Sequence) and not isinstance(lambdas, str):
        values = list(lambdas)
    else:
        raise TypeError(f"`lambdas` must be a sequence of K numbers, got {type(lambdas).__name__}")
    if not values:
        raise ValueError("`lambdas` is empty: there must be at least one loss")
    for v in values:
        if not is_number(v) or not math.isfinite(v):
            raise ValueError(f"`lambdas` must hold finite numbers, got {values!r}")
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class ConductorConfig:
    """Hyper-parameters of GradientConductor (GCond, arXiv:2509.07252); the docs' GCond guide lists
    each one with its formula and the reference implementation's name (in brackets below).

    Attributes:
        lambdas: ``K`` loss weights, applied to each micro-batch loss.
        accumulation_steps: ``N`` micro-batches per cycle.
        stochastic: [stochastic_accumulation] each loss on its own ``N/K`` micro-batches
            (``N % K == 0``); else every loss on every micro-batch, one forward each.
        thresholds: [conflict_thresholds] ``(critical, main, weak)`` cosines, non-decreasing.
        rule: ``"smooth"`` [use_smooth_logic=True] or ``"zones"``.
        max_iters: [projection_max_iters] resolution iterations; None → ``2K``; 0 → none.
        remap_power: ``p`` of the smooth rule's main-zone remap.
        norm_cap: per-loss L2 cap of the accumulated gradients (None: off).
        norm_ema_beta: EMA factor of the per-loss gradient norms (the arbitrator's strength).
        momentum_beta: ``β`` of GCond's bias-corrected momentum.
        use_lion: the Lion branch: sign of the momentum times a clipped trust ratio.
        trust_ratio_coef: the Lion branch's step scale.
        trust_ratio_clip: the Lion branch's bound on ``‖p‖/‖u‖``.
        dominance_window: ``W``: a task that won the last ``W`` arbitrations is dominant.
        dominance: ``"loses"`` (the reference's code) or ``"wins"`` (its README).
        tie_breaking_weights: ``(stability, strength)`` weights of the arbitrator's score.
        return_raw_grad: return the resolved sum instead of the momentum output.
        eps: the numerical floor of the cosines and projections.
        accumulation_dtype: float32 (reference: bfloat16) for the accumulators and momentum.
        stability_source: ``"raw"`` previous gradients (reference: ``"processed"``).
        min_cosine: ``"true"`` minimum (reference: ``"reference"``).
        arbitrate_weak: record weak-zone pairs in the history (reference: True).
        norm_floor: skip gradients below this norm (None: ``eps``; reference: ``sqrt(eps)``).
        cap_single_loss: apply the cap with one loss too (reference: False).
        resolution: ``"gramian"`` (exact arithmetic on the ``K×K`` Gramian), ``"vectors"`` (the
            reference's vector passes, each projection rounded to the accumulation dtype:
            :func:`gradfn.conflict.resolve_vectors`) or ``"auto"``: ``"vectors"`` for bfloat16
            accumulators, where rounding moves the reference's decisions, else ``"gramian"``.
        strategy: per-task gradient strategy of the classic mode (:mod:`gradfn.autodiff`).

    :func:`reference_options` gives the values that reproduce the reference implementation.
    """

    lambdas: tuple[float, ...]
    accumulation_steps: int
    stochastic: bool = True
    thresholds: tuple[float, float, float] = (-0.8, -0.5, 0.0)
    rule: Rule = "smooth"
    max_iters: int | None = None
    remap_power: float = 2.0
    norm_cap: float | None = None
    norm_ema_beta: float = 0.95
    momentum_beta: float = 0.85
    use_lion: bool = False
    trust_ratio_coef: float = 1e-4
    trust_ratio_clip: float = 100.0
    dominance_window: int = 3
    dominance: DominanceRule = "loses"
    tie_breaking_weights: tuple[float, float] = (0.8, 0.2)
    return_raw_grad: bool = False
    eps: float = 1e-8
    accumulation_dtype: torch.dtype = torch.float32
    stability_source: Literal["raw", "processed"] = "raw"
    min_cosine: Literal["true", "reference"] = "true"
    arbitrate_weak: bool = False
    norm_floor: float | None = None
    cap_single_loss: bool = True
    resolution: Literal["auto", "gramian", "vectors"] = "auto"
    strategy: Literal["auto", "vmap", "loop"] = "auto"

    def __post_init__(self) -> None:
        plain_scalars(self)
        lam = _lambdas(self.lambdas)
        object.__setattr__(self, "lambdas", lam)
        k = len(lam)
        n = check_int("accumulation_steps", self.accumulation_steps, 1)
        for name in ("stochastic", "use_lion", "return_raw_grad", "arbitrate_weak"):
            object.__setattr__(self, name, bool(getattr(self, name)))
        object.__setattr__(self, "cap_single_loss", bool(self.cap_single_loss))
        if self.stochastic and n % k != 0:
            raise ValueError(
                f"stochastic accumulation gives each of the K={k} losses N/K micro-batches: "
                f"`accumulation_steps` (N={n}) must be divisible by K={k}; or use classic "
                "accumulation, every loss on every micro-batch: stochastic=False "
                "(GradientConductor: stochastic_accumulation=False)"
            )
        t = check_thresholds(self.thresholds, "conflict_thresholds")
        object.__setattr__(self, "thresholds", (t[0], t[1], t[2]))
        check_choice("rule", self.rule, ("smooth", "zones"))
        check_optional_int("projection_max_iters", self.max_iters, 0)
        check_positive("remap_power", self.remap_power)
        if self.norm_cap is not None:
            check_positive("norm_cap", self.norm_cap)
        check_beta("norm_ema_beta", self.norm_ema_beta)
        check_beta("momentum_beta", self.momentum_beta)
        check_positive("trust_ratio_coef", self.trust_ratio_coef)
        check_positive("trust_ratio_clip", self.trust_ratio_clip)
        check_int("dominance_window", self.dominance_window, 0)
        check_choice("dominance", self.dominance, ("loses", "wins"))
        w = tuple(self.tie_breaking_weights)
        if len(w) != 2 or not all(is_number(x) and 0 <= x < math.inf for x in w) or sum(w) <= 0:
            raise ValueError(
                "`tie_breaking_weights` must be 2 non-negative numbers (stability, strength) with a "
                f"positive sum, got {self.tie_breaking_weights!r}"
            )
        object.__setattr__(self, "tie_breaking_weights", (float(w[0]), float(w[1])))
        check_positive("eps", self.eps)
        check_choice("accumulation_dtype", self.accumulation_dtype, _ACCUMULATION_DTYPES)
        check_choice("stability_source", self.stability_source, ("raw", "processed"))
        check_choice("min_cosine", self.min_cosine, ("true", "reference"))
        if self.norm_floor is not None:
            floor = self.norm_floor
            bad = not is_number(floor)
            if bad or not (math.isfinite(floor) and floor >= 0):
                raise ValueError(f"`norm_floor` must be None or a number >= 0, got {floor!r}")
        check_choice("strategy", self.strategy, ("auto", "vmap", "loop"))
        check_choice("resolution", self.resolution, ("auto", "gramian", "vectors"))

    @property
    def num_tasks(self) -> int:
        """``K``, the number of losses."""
        return len(self.lambdas)

    @property
    def resolves_vectors(self) -> bool:
        """Whether the resolution runs as vector passes (``resolution``, ``"auto"`` resolved)."""
        if self.resolution == "auto":
            return self.accumulation_dtype == torch.bfloat16
        return self.resolution == "vectors"

    @classmethod
    def from_reference(
        cls,
        lambdas: Sequence[float],
        accumulation_steps: int,
        *,
        projection_max_iters: int | None = None,
        conflict_thresholds: Sequence[float] = (-0.8, -0.5, 0.0),
        use_smooth_logic: bool = True,
        stochastic_accumulation: bool = True,
        reference: bool = False,
        **options: Any,
    ) -> ConductorConfig:
        """The config of the reference implementation's constructor arguments (its names and
        defaults; ``projection_max_iters=0`` means ``2K`` there, as ``None``). ``reference=True``
        starts from :func:`reference_options`; ``options`` are :class:`ConductorConfig` fields and
        win over both (``None`` keeps the default)."""
        eps = options.get("eps", 1e-8)
        base = reference_options(eps) if reference else {}
        base.update({k: v for k, v in options.items() if v is not None})
        unknown = sorted(set(base) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown GradientConductor option(s) {unknown}")
        return cls(
            lambdas=tuple(lambdas),
            accumulation_steps=accumulation_steps,
            stochastic=stochastic_accumulation,
            thresholds=tuple(conflict_thresholds),  # type: ignore[arg-type]
            rule="smooth" if use_smooth_logic else "zones",
            max_iters=projection_max_iters or None,
            **base,
        )
