"""The aggregator *functions* (``gradfn.aggregators.cagrad(grads, c=...)``, ...) check their
numeric hyper-parameters as ``aggregator(name, ...)`` does: NaN, ±inf, a string, a bool or a
fractional iteration count fail with an error naming the argument, numpy scalars of valid values
give the very result of the Python number, and a precomputed ``gram`` must be ``(K, K)``.

The numeric hyper-parameters are discovered from the signatures (an ``int`` or ``float``
annotation), so a new one is swept without touching this file.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import gradfn.aggregators as A
from gradfn.aggregators._registry import _SEEDED, _STATELESS

FUNCTIONS: dict[str, Callable[..., A.Aggregated]] = {**_STATELESS, **_SEEDED}
# a valid value for the numeric hyper-parameters whose default is None
VALID = {"rcond": 1e-6, "leak": 0.25}
GRADS = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))


def _numeric(method: str) -> list[tuple[str, Any, bool]]:
    """``(name, valid value, is an integer)`` per numeric hyper-parameter of ``method``."""
    fn = FUNCTIONS[method]
    sig = inspect.signature(getattr(fn, "weights_fn", fn))
    out = []
    for p in list(sig.parameters.values())[1:]:
        ann = str(p.annotation)
        if p.name == "active" or not (ann.startswith("int") or "float" in ann.split("[")[0]):
            continue
        value = VALID.get(p.name, p.default)
        out.append((p.name, value, ann.startswith("int")))
    return out


PARAMS = [(m, n, v, i) for m in FUNCTIONS for n, v, i in _numeric(m)]
IDS = [f"{m}-{n}" for m, n, _, _ in PARAMS]


def _bad_values(is_int: bool) -> list[Any]:
    common: list[Any] = [math.nan, math.inf, "x", True]
    return [*common, 2.5, -math.inf] if is_int else [*common, -math.inf]


def _via_aggregator(method: str, **hp: Any) -> A.Aggregated:
    agg = A.aggregator(method, **hp)
    return agg.update(agg.init(3), GRADS)[1]


def test_the_sweep_finds_the_known_hyper_parameters():
    found = {(m, n) for m, n, _, _ in PARAMS}
    assert {("mgda", "iters"), ("mgda", "epsilon"), ("cagrad", "stationary_eps")} <= found
    assert {("config", "rcond"), ("pcgrad", "seed"), ("graddrop", "leak")} <= found
    assert {("upgrad", "norm_eps"), ("dualproj", "reg_eps"), ("fairgrad", "alpha")} <= found


@pytest.mark.parametrize(("method", "name", "valid", "is_int"), PARAMS, ids=IDS)
def test_functions_reject_invalid_values_naming_the_argument(method, name, valid, is_int):
    for value in _bad_values(is_int):
        with pytest.raises((ValueError, TypeError), match=f"`{name}`"):
            FUNCTIONS[method](GRADS, **{name: value})
        with pytest.raises((ValueError, TypeError), match=f"`{name}`"):
            _via_aggregator(method, **{name: value})


@pytest.mark.parametrize(("method", "name", "valid", "is_int"), PARAMS, ids=IDS)
def test_numpy_scalars_give_the_result_of_the_python_number(method, name, valid, is_int):
    as_numpy = np.int64(valid) if is_int else np.float64(valid)
    for run in (
        lambda **hp: FUNCTIONS[method](GRADS, **hp),
        lambda **hp: _via_aggregator(method, **hp),
    ):
        want = run(**{name: valid}).grad
        got = run(**{name: as_numpy}).grad
        assert torch.equal(got, want), (method, name)


def test_a_scalar_leak_is_the_leak_of_every_task():
    got = A.graddrop(GRADS, leak=0.25, seed=3).grad
    want = A.graddrop(GRADS, leak=torch.full((3,), 0.25), seed=3).grad
    assert torch.equal(got, want)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="`leak`"):
            A.graddrop(GRADS, leak=bad)


GRAM_METHODS = [m for m in A.METHODS if m not in ("mean", "sum", "graddrop")]  # gram ignored


@pytest.mark.parametrize("method", GRAM_METHODS)
def test_a_precomputed_gram_must_be_k_by_k(method):
    def calls(gram: Any) -> list[Callable[[], Any]]:
        agg = A.aggregator(method)
        out = [lambda: agg.update(agg.init(3), GRADS, gram=gram)]
        if method in FUNCTIONS:
            out.append(lambda: FUNCTIONS[method](GRADS, gram=gram))
        return out

    for call in calls(torch.eye(4)):
        with pytest.raises(ValueError, match=r"`gram` must have shape \(3, 3\)"):
            call()
    for call in calls((GRADS @ GRADS.T).tolist()):
        with pytest.raises(TypeError, match=r"`gram` must be a \(3, 3\) tensor"):
            call()
