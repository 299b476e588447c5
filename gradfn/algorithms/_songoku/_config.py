"""SON-GOKU's hyper-parameters: one frozen dataclass that validates itself."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Literal

from gradfn._internal.checks import (
    check_beta,
    check_choice,
    check_int,
    check_nonnegative,
    check_optional_int,
    check_seed,
    is_number,
    plain_scalars,
)
from gradfn.aggregators import Aggregator, as_aggregator
from gradfn.conflict import GraphRule
from gradfn.schedules import TauSchedule
from gradfn.weighting import LossWeighting

__all__ = ["SonGokuConfig", "from_reference"]

EMA_MODES = ("active", "refresh")
REDUCTIONS = ("sum", "mean")
PER_TASK_ROWS = ("auto", "all", "active")
STRATEGIES = ("auto", "vmap", "loop")


def _tau_schedule(value: Any) -> TauSchedule:
    if value is None:
        return TauSchedule()
    if isinstance(value, TauSchedule):
        return value
    if is_number(value):
        return TauSchedule("constant", tau_target=float(value))
    raise TypeError(f"`tau_schedule` must be a TauSchedule, a number or None, got {value!r}")


def _shared(value: Any) -> frozenset[str] | Callable[[str], bool] | None:
    if value is None or callable(value):
        return value
    if isinstance(value, str) or not isinstance(value, Collection):
        raise TypeError(
            "`shared` must be None, a predicate on dotted parameter names or a collection of "
            f"names, got {type(value).__name__}"
        )
    return frozenset(value)


def _check_loss_weighting(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, LossWeighting):
        raise TypeError(
            f"`loss_weighting` must be a weighting.LossWeighting or None, got {type(value).__name__}"
        )
    if value.penalty is not None or value.name == "gradnorm":
        raise ValueError(
            f"`loss_weighting`: {value.name!r} needs the model's parameters or a layer (learned "
            "weights, GradNorm); inside SON-GOKU only weightings from loss values (dwa, rlw, famo)"
        )


@dataclass(frozen=True)
class SonGokuConfig:
    """Hyper-parameters of SON-GOKU (arXiv:2509.16959); the docs' SON-GOKU guide lists each one
    with its equation and the reference implementation's name.

    Attributes:
        num_tasks: ``K ≥ 1``.
        shared: which parameters are shared (their gradients enter the EMA, the interference and
            the in-group aggregator): a collection of dotted names, a predicate on names, or None
            (all parameters). The others (heads) receive each active task's own gradient.
        refresh_period: ``R ≥ 1``, steps between recolourings.
        tau_schedule: ``τ(t)``: a :class:`~gradfn.schedules.TauSchedule`, a constant, or None
            (constant 0.25, the reference default).
        ema_beta: ``β ∈ [0, 1)`` of the per-task gradient EMAs.
        ema_mode: ``"active"`` (paper: the active tasks' EMAs every step) or ``"refresh"`` (every
            task probed once per refresh window).
        min_updates_per_cycle: ``f_min ≥ 1``; above 1, minimum-coverage duplication (§4.4).
        aggregator: how the active group's shared gradients combine: None (their sum, Eq. 6), an
            :class:`~gradfn.aggregators.Aggregator` or a method name of
            :func:`gradfn.aggregators.aggregator` (stateful ones keep their state in the SON-GOKU
            state).
        weight_heads: the aggregator's task weights also scale each active task's head gradient
            (the reference's inverse-norm weighting does this).
        reduction: ``"sum"`` (paper) or ``"mean"``: the step's gradient divided by ``|S_t|``.
        graph: the conflict-graph rule (:class:`~gradfn.conflict.GraphRule`).
        sketch_dim: ``d_sk``: keep the EMA as a ``(K, d_sk)`` CountSketch (None: dense).
        seed: seed of the sketch.
        eps: added to the norms in ``−cos`` (the reference's ``eps_cosine``).
        strategy: per-task gradient strategy of :mod:`gradfn.autodiff`.
        per_task_rows: ``"all"`` differentiates all ``K`` tasks every per-task step (fixed shapes,
            needed under ``torch.compile``); ``"active"`` only the tasks that need it (reads the
            group on the host, eager only); ``"auto"``: ``"all"`` while compiling.
        legacy_pointer: start each refresh window at group 1, as the reference does.
        loss_weighting: a :class:`~gradfn.weighting.LossWeighting` from loss values (DWA, RLW,
            FAMO): each step it sees the ``K`` losses, its weights are restricted to the active
            group and renormalised to sum to ``|S_t|``, and they scale the group's per-task
            gradients before the aggregator (its state is in the SON-GOKU state). None: none.
    """

    num_tasks: int
    shared: frozenset[str] | Callable[[str], bool] | None = None
    refresh_period: int = 32
    tau_schedule: TauSchedule = field(default_factory=TauSchedule)
    ema_beta: float = 0.9
    ema_mode: Literal["active", "refresh"] = "active"
    min_updates_per_cycle: int = 1
    aggregator: Aggregator | None = None
    weight_heads: bool = False
    reduction: Literal["sum", "mean"] = "sum"
    graph: GraphRule = field(default_factory=GraphRule)
    sketch_dim: int | None = None
    seed: int = 0
    eps: float = 1e-12
    strategy: Literal["auto", "vmap", "loop"] = "auto"
    per_task_rows: Literal["auto", "all", "active"] = "auto"
    legacy_pointer: bool = False
    loss_weighting: LossWeighting | None = None

    def __post_init__(self) -> None:
        plain_scalars(self)
        check_int("num_tasks", self.num_tasks, 1)
        object.__setattr__(self, "shared", _shared(self.shared))
        check_int("refresh_period", self.refresh_period, 1)
        object.__setattr__(self, "tau_schedule", _tau_schedule(self.tau_schedule))
        object.__setattr__(self, "ema_beta", check_beta("ema_beta", self.ema_beta))
        check_choice("ema_mode", self.ema_mode, EMA_MODES)
        check_int("min_updates_per_cycle", self.min_updates_per_cycle, 1)
        if self.aggregator is not None and not isinstance(self.aggregator, Aggregator):
            if not isinstance(self.aggregator, str):
                raise TypeError(
                    "`aggregator` must be None, an aggregators.Aggregator or a method name, got "
                    f"{type(self.aggregator).__name__}"
                )
            object.__setattr__(self, "aggregator", as_aggregator(self.aggregator))
        object.__setattr__(self, "weight_heads", bool(self.weight_heads))
        check_choice("reduction", self.reduction, REDUCTIONS)
        if not isinstance(self.graph, GraphRule):
            raise TypeError(f"`graph` must be a GraphRule, got {type(self.graph).__name__}")
        check_optional_int("sketch_dim", self.sketch_dim, 1)
        check_seed("seed", self.seed)
        check_nonnegative("eps", self.eps)
        check_choice("strategy", self.strategy, STRATEGIES)
        check_choice("per_task_rows", self.per_task_rows, PER_TASK_ROWS)
        object.__setattr__(self, "legacy_pointer", bool(self.legacy_pointer))
        _check_loss_weighting(self.loss_weighting)

    @property
    def one_backward(self) -> bool:
        """Steps outside the EMA updates need only ONE backward (of the active group's sum)."""
        return (
            self.ema_mode == "refresh" and self.aggregator is None and self.loss_weighting is None
        )

    def is_shared(self, name: str) -> bool:
        """Is the parameter ``name`` shared?"""
        if self.shared is None:
            return True
        if callable(self.shared):
            return bool(self.shared(name))
        return name in self.shared


_BASE_METHODS = ("vanilla", "none", "pcgrad", "pcgrad_sum", "adatask", "inverse_norm")


def from_reference(
    num_tasks: int,
    *,
    refresh_period: int = 32,
    tau_schedule: TauSchedule | None = None,
    ema_beta: float = 0.9,
    min_updates_per_cycle: int = 1,
    base_method: str = "vanilla",
    eps_cosine: float = 1e-12,
    hook: Aggregator | None = None,
    **options: Any,
) -> dict[str, Any]:
    """The config options of the reference implementation's scheduler arguments: ``eps_cosine``
    is ``eps``; ``base_method`` ``"pcgrad"`` is PCGrad averaged over the group (``"pcgrad_sum"``:
    summed, as the reference), ``"adatask"`` / ``"inverse_norm"`` the inverse-norm weighting
    (also on the heads) and overrides ``hook`` (the reference's ``gradient_transform`` as an
    aggregator), as in the reference; ``options`` are further :class:`SonGokuConfig` fields
    (``shared`` is not: the scheduler finds it, or takes a ``shared_param_filter``)."""
    from gradfn.aggregators import aggregator

    if "shared" in options:
        raise TypeError("`shared` is not an option of the scheduler: pass shared_param_filter")
    if hook is not None and base_method not in ("vanilla", "none"):
        warnings.warn(
            f"base_method={base_method!r} overrides gradient_transform (as in the reference)",
            UserWarning,
            stacklevel=3,
        )
    elif hook is not None:
        options["aggregator"] = hook

    if tau_schedule is not None and not isinstance(tau_schedule, TauSchedule):
        raise TypeError(
            f"`tau_schedule` must be a TauSchedule or None, got {type(tau_schedule).__name__}"
        )
    check_choice("base_method", base_method, _BASE_METHODS)
    check_nonnegative("eps_cosine", eps_cosine)
    if base_method in ("pcgrad", "pcgrad_sum"):
        mean = "mean" if base_method == "pcgrad" else "sum"
        options["aggregator"] = aggregator("pcgrad", seed=options.get("seed", 0), reduction=mean)
    elif base_method in ("adatask", "inverse_norm"):
        options.update(aggregator=aggregator("inverse_norm"), weight_heads=True)
    return dict(
        num_tasks=num_tasks,
        refresh_period=refresh_period,
        tau_schedule=tau_schedule,
        ema_beta=ema_beta,
        min_updates_per_cycle=min_updates_per_cycle,
        eps=eps_cosine,
        **options,
    )
