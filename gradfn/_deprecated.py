"""gradfn 0.1 names and module paths, kept for one release with a ``DeprecationWarning``.

0.1 had flat modules (``gradfn.graph``, ``gradfn.resolve``, ``gradfn.songoku_scheduler``, …) and
top-level names for layer-3 pieces (``gradfn.color``, ``gradfn.resolve``, …). Their 0.2 homes are
packages (:mod:`gradfn.conflict`, :mod:`gradfn.algorithms`, :mod:`gradfn.adapters`,
:mod:`gradfn.integrations`). The old module paths are registered here as light modules that forward
each name to its new home and warn; nothing of 0.2 imports them. They go in 0.3.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import Any

__all__ = ["MODULE_NAMES", "TOP_LEVEL", "install", "moved"]

_CONFLICT = "gradfn.conflict"
_ALGOS = "gradfn.algorithms"

# gradfn.<name> of 0.1 that is no longer a top-level name
TOP_LEVEL: dict[str, str] = {
    "Transform": f"{_ALGOS}:Algorithm",
    "ResolveResult": f"{_CONFLICT}:ResolveResult",
    "choose_strategy": "gradfn.autodiff:choose_strategy",
    "color": f"{_CONFLICT}:color",
    "conflict_adjacency": f"{_CONFLICT}:conflict_adjacency",
    "duplicate_min_coverage": f"{_CONFLICT}:duplicate_min_coverage",
    "groups_from_colors": f"{_CONFLICT}:groups_from_colors",
    "interference": f"{_CONFLICT}:interference",
    "resolve": f"{_CONFLICT}:resolve",
    "resolve_gramian": f"{_CONFLICT}:resolve_gramian",
    "sketch": f"{_CONFLICT}:sketch",
    "tau_value": "gradfn.schedules:tau_value",
}


def _same(module: str, names: str) -> dict[str, str]:
    return {n: f"{module}:{n}" for n in names.split()}


_MODULES: dict[str, dict[str, str]] = {
    "gradfn.base": {"Transform": f"{_ALGOS}:Algorithm", "PyTree": "gradfn.typing:PyTree"},
    "gradfn.graph": _same(
        _CONFLICT,
        "GRAPH_RULES conflict_adjacency edge_density interference knn_k_for_density",
    ),
    "gradfn.coloring": _same(
        _CONFLICT, "color duplicate_min_coverage groups_from_colors welsh_powell_order"
    ),
    "gradfn.sketch": _same(_CONFLICT, "SKETCH_METHODS count_sketch_hashes projection_block sketch"),
    "gradfn.resolve": _same(
        _CONFLICT,
        "ResolveResult Rule check_thresholds cross_gramian pair_cosines resolve resolve_gramian "
        "true_min_cosine",
    ),
    "gradfn.arbitrator": {
        **_same(
            _CONFLICT,
            "DominanceRule arbitrate init_history is_dominant push_history second_wins stability",
        ),
        "update_norm_ema": "gradfn.transforms:ema_of_norms",
    },
    "gradfn.songoku": {
        **_same(_ALGOS, "SonGokuState songoku"),
        "SonGokuTransform": f"{_ALGOS}:SonGoku",
        "BUILTIN_TRANSFORMS": "gradfn._deprecated:BUILTIN_TRANSFORMS",
    },
    "gradfn.songoku_scheduler": _same("gradfn.adapters", "SonGokuScheduler TaskSpec TauSchedule"),
    "gradfn.conductor": {
        **_same(_ALGOS, "ConductorConfig ConductorState conductor reference_options"),
        **{
            n: f"gradfn._deprecated:{n}"
            for n in ["accumulate", "discard_cycle", "init_state", "make_config", "process"]
        },
    },
    "gradfn.conductor_adapter": _same("gradfn.adapters", "GradientConductor"),
    "gradfn.amp": _same("gradfn.integrations.amp", "poison_like scale_losses unscale"),
    "gradfn.distributed": _same(
        "gradfn.integrations.distributed",
        "DEFAULT_BUCKET_BYTES all_reduce_mean broadcast_tree is_distributed make_reducer "
        "world_size",
    ),
    "gradfn.songoku_transforms": {},
}

BUILTIN_TRANSFORMS: tuple[str, ...] = ("pcgrad", "pcgrad_sum", "inverse_norm", "adatask")

# the 0.1 modules that gradfn.<name> gives back (songoku, conductor, resolve and sketch are the
# functions there, as in 0.1)
MODULE_NAMES = frozenset(
    name.split(".", 1)[1]
    for name in _MODULES
    if name.split(".", 1)[1] not in ("songoku", "conductor", "resolve", "sketch")
)


def moved(old: str, target: str) -> Any:
    """The object at ``target`` (``"module:attr"``), with a warning that ``old`` moved there."""
    module, attr = target.split(":")
    if not module.startswith("gradfn._deprecated"):
        warnings.warn(
            f"{old} is deprecated since gradfn 0.2 and will be removed in 0.3: use {module}.{attr}",
            DeprecationWarning,
            stacklevel=3,
        )
    else:
        warnings.warn(
            f"{old} is deprecated since gradfn 0.2 and will be removed in 0.3 (see the changelog)",
            DeprecationWarning,
            stacklevel=3,
        )
    return getattr(importlib.import_module(module), attr)


class _MovedModule(types.ModuleType):
    """A 0.1 module path whose names live elsewhere now."""

    def __init__(self, name: str, targets: dict[str, str]) -> None:
        super().__init__(name, f"Deprecated gradfn 0.1 module (see {__name__}).")
        self._targets = targets

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        target = self._targets.get(attr)
        if target is None:
            raise AttributeError(
                f"{self.__name__}.{attr} does not exist in gradfn 0.2 (the module {self.__name__} "
                "is a deprecated 0.1 path; see the changelog for where its names went)"
            )
        return moved(f"{self.__name__}.{attr}", target)

    def __dir__(self) -> list[str]:
        return sorted(self._targets)


def install() -> None:
    """Register the 0.1 module paths (only the import system sees them: not package attributes)."""
    for name, targets in _MODULES.items():
        sys.modules.setdefault(name, _MovedModule(name, targets))


# --------------------------------------------------------------------------------------------
# 0.1 GradientConductor functions whose signatures changed


def make_config(lambdas: Any, accumulation_steps: int, **kwargs: Any) -> Any:
    """0.1 ``make_config``: a :class:`~gradfn.algorithms.ConductorConfig`."""
    from gradfn.algorithms import ConductorConfig

    kwargs.pop("skip_guard", None)
    return ConductorConfig(lambdas=lambdas, accumulation_steps=accumulation_steps, **kwargs)


def init_state(config: Any, params: Any) -> Any:
    """0.1 ``init_state(config, params)``."""
    from gradfn.algorithms._conductor._process import init_state as init

    return init(config, params)


def accumulate(config: Any, loss_fn: Any, params: Any, microbatches: Any) -> tuple[Any, Any, Any]:
    """0.1 ``accumulate``: ``(A, losses, raw_losses)``."""
    from gradfn.algorithms._conductor._accumulate import accumulate as acc

    cycle = acc(config, loss_fn, params, microbatches)
    return cycle.grads, cycle.losses, cycle.raw_losses


def process(
    config: Any, state: Any, grads: Any, losses: Any, raw_losses: Any, params: Any
) -> tuple[Any, Any]:
    """0.1 ``process(config, state, grads, losses, raw_losses, params)``."""
    from gradfn.algorithms._conductor._process import make_process

    return make_process(config)(state, grads, losses, raw_losses, params)


def discard_cycle(old: Any, new: Any) -> Any:
    """0.1 ``discard_cycle``: ``old``'s algorithm state with ``new``'s statistics."""
    import torch

    from gradfn.algorithms import ConductorState
    from gradfn.transforms import ApplyIfFiniteState

    inner = ApplyIfFiniteState(old.inner.inner, new.inner.skipped, new.inner.num_skipped)
    stats = new.stats._replace(final_grad_norm=torch.zeros_like(new.stats.final_grad_norm))
    return ConductorState(inner, stats, new.touched)
