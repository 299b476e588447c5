"""Every float hyper-parameter of every public config, factory and aggregator rejects NaN and
±inf with a ValueError naming it.

The float hyper-parameters are discovered from the signatures (a ``float`` default or a ``float``
annotation), so a new one is swept without touching this file; a public callable with float
parameters that this file cannot build must be listed in ``EXEMPT`` with the reason.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradfn.aggregators as A
from gradfn.adapters import GradientConductor, SonGokuScheduler, TaskSpec

BAD = [math.nan, math.inf, -math.inf]
MODULES = (
    "gradfn.transforms",
    "gradfn.schedules",
    "gradfn.algorithms",
    "gradfn.conflict",
    "gradfn.weighting",
)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _specs() -> list[TaskSpec]:
    return [TaskSpec(n, lambda m, b, i=i: m(b)[:, i].sum()) for i, n in enumerate("ab")]


# valid values of required arguments, by name
REQUIRED: dict[str, Any] = {
    "num_tasks": 2,
    "lambdas": (1.0, 1.0),
    "accumulation_steps": 2,
    "max_norm": 1.0,
    "eps": 1e-8,
    "beta": 0.5,
    "gram": torch.eye(2),
    "grads": {"w": torch.ones(2, 3)},
    "rho": torch.zeros(2, 2),
    "norm_floor": 0.0,
    "density": 0.5,
}
# public callables with float parameters that take tensors or state beyond REQUIRED: the pure
# per-step kernels (their hyper-parameters come from a checked config)
EXEMPT = {
    "cap_factors": "kernel: norms tensor; `max_norm`/`eps` come from norm_cap/lion",
    "ema_of_norms": "kernel: an EMA tensor; `beta`/`eps` come from norm_ema/ConductorConfig",
    "arbitrate": "kernel of resolve_gramian: history tensors",
    "second_wins": "kernel of resolve_gramian: history tensors",
    "pair_cosines": "kernel of resolve_gramian / true_min_cosine, which check `eps`, `norm_floor`",
    "stability": "kernel: previous-step tensors; `eps` from ConductorConfig",
    "knn_k_for_density": "integer helper; `density` is checked by GraphRule",
    "interference": "a diagnostic of a Gramian: `eps` only guards a division",
    "dwa_weights": "kernel: a DWA state; `temperature` comes from the checked dwa()",
    "famo_weights": "kernel: a FAMO state; its settings come from the checked famo()",
    "famo_update_logits": "kernel: a FAMO state; its settings come from the checked famo()",
}


def _float_params(fn: Callable[..., Any]) -> list[str]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    out = []
    for p in sig.parameters.values():
        ann = str(p.annotation)
        if (isinstance(p.default, float) and not isinstance(p.default, bool)) or ann in (
            "float",
            "float | None",
        ):
            out.append(p.name)
    return out


def _discovered() -> list[tuple[str, str, str]]:
    cases = []
    for mod_name in MODULES:
        mod = importlib.import_module(mod_name)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if not callable(obj) or name in EXEMPT:
                continue
            cases += [(mod_name, name, p) for p in _float_params(obj)]
    return cases


def _call(fn: Callable[..., Any], param: str, value: float) -> None:
    sig = inspect.signature(fn)
    kwargs: dict[str, Any] = {}
    for p in sig.parameters.values():
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            kwargs[p.name] = REQUIRED[p.name]
    kwargs[param] = value
    fn(**kwargs)


@pytest.mark.parametrize(("module", "name", "param"), _discovered())
@pytest.mark.parametrize("value", BAD)
def test_public_float_hyper_parameters_reject_non_finite(module, name, param, value):
    fn = getattr(importlib.import_module(module), name)
    with pytest.raises(ValueError, match=param):
        _call(fn, param, value)


def _aggregator_params() -> list[tuple[str, str]]:
    out = []
    for method in A.METHODS:
        agg_fn = {"gradvac": A.gradvac, "nash_mtl": A.nash_mtl, "inverse_norm": A.inverse_norm}
        fn = agg_fn.get(method) or getattr(A, f"{method}_weights", None) or getattr(A, method)
        out += [(method, p) for p in _float_params(fn)]
    return out


@pytest.mark.parametrize(("method", "param"), _aggregator_params())
@pytest.mark.parametrize("value", BAD)
def test_aggregator_float_hyper_parameters_reject_non_finite(method, param, value):
    with pytest.raises(ValueError, match=param):
        A.aggregator(method, **{param: value})


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("param", ["ema_beta", "eps_cosine"])
def test_songoku_scheduler_rejects_non_finite(param, value):
    with pytest.raises(ValueError, match=param):
        SonGokuScheduler(_Net(), _specs(), **{param: value})


@pytest.mark.parametrize("value", BAD)
def test_gradient_conductor_rejects_non_finite(value):
    losses = {"a": lambda out, y: out[:, 0].sum(), "b": lambda out, y: out[:, 1].sum()}
    for param in ("eps", "trust_ratio_coef", "trust_ratio_clip", "remap_power"):
        with pytest.raises(ValueError, match=param):
            GradientConductor(_Net(), losses, {"a": 1.0, "b": 1.0}, 2, **{param: value})
    with pytest.raises(ValueError, match="lambdas"):
        GradientConductor(_Net(), losses, {"a": value, "b": 1.0}, 2)


def test_the_sweep_finds_the_known_hyper_parameters():
    found = {(n, p) for _, n, p in _discovered()}
    assert {("ConductorConfig", "trust_ratio_coef"), ("ConductorConfig", "eps")} <= found
    assert {("lion", "coef"), ("SonGokuConfig", "eps"), ("resolve_gramian", "eps")} <= found
    assert {("upgrad", "reg_eps"), ("cagrad", "c")} <= set(_aggregator_params())
