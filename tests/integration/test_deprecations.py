"""gradfn 0.1 names, module paths and options keep working in 0.2 with a ``DeprecationWarning``
that names their new home; the 0.2 names warn about nothing.

This is the one test module that uses the 0.1 spellings (the others run with gradfn's deprecation
warnings turned into errors, see ``tests/conftest.py``).
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import warnings

import pytest
import torch

import gradfn
import gradfn.aggregators as A
from gradfn import _deprecated, aggregators
from gradfn.algorithms import conductor, songoku
from gradfn.conflict import color
from tests._utils import ROOT
from tests._utils.asserts import leaves_equal, tree_equal
from tests.unit.aggregators._common import jac, split
from tests.unit.algorithms.conductor._problem import (
    LAMBDAS,
    make_batches,
    make_params,
    two_losses,
)
from tests.unit.algorithms.songoku._linear import batches, linear_loss, planted
from tests.unit.algorithms.songoku._linear import make_params as sg_params


def _target(spec: str):
    module, attr = spec.split(":")
    return module, attr, getattr(importlib.import_module(module), attr)


def _new_home(spec: str) -> str:
    module, attr = spec.split(":")
    if module.startswith("gradfn._deprecated"):
        return "see the changelog"  # a 0.1 signature kept as is
    return f"use {module}.{attr}"


# ---------------------------------------------------------------------------------------------
# top-level names


@pytest.mark.parametrize("name", sorted(_deprecated.TOP_LEVEL))
def test_every_01_top_level_name_works_and_warns(name):
    spec = _deprecated.TOP_LEVEL[name]
    _, _, obj = _target(spec)
    with pytest.warns(DeprecationWarning, match=re.escape(f"gradfn.{name} is deprecated")) as rec:
        got = getattr(gradfn, name)
    assert got is obj
    assert any(_new_home(spec) in str(w.message) for w in rec), [str(w.message) for w in rec]


def test_unknown_top_level_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        gradfn.no_such_name  # noqa: B018


def test_a_01_top_level_function_still_computes():
    adj = torch.tensor([[False, True, False], [True, False, True], [False, True, False]])
    with pytest.warns(DeprecationWarning, match="gradfn.conflict.color"):
        old_color = gradfn.color
    assert torch.equal(old_color(adj), color(adj))
    with pytest.warns(DeprecationWarning, match="gradfn.schedules.tau_value"):
        tau_value = gradfn.tau_value
    assert tau_value(gradfn.TauSchedule(), 5) == 0.25


# ---------------------------------------------------------------------------------------------
# module paths

MODULE_NAMES = [(m, n) for m, targets in _deprecated._MODULES.items() for n in sorted(targets)]


@pytest.mark.parametrize("module", sorted(_deprecated._MODULES))
def test_every_01_module_path_imports(module):
    mod = importlib.import_module(module)
    assert mod is sys.modules[module]
    assert sorted(dir(mod)) == sorted(_deprecated._MODULES[module])
    with pytest.raises(AttributeError, match=r"does not exist in gradfn 0\.2"):
        mod.no_such_name  # noqa: B018


@pytest.mark.parametrize(("module", "name"), MODULE_NAMES)
def test_every_name_of_a_01_module_forwards_and_warns(module, name):
    spec = _deprecated._MODULES[module][name]
    _, _, obj = _target(spec)
    with pytest.warns(DeprecationWarning, match=re.escape(f"{module}.{name} is deprecated")) as rec:
        got = getattr(importlib.import_module(module), name)
    assert got is obj
    assert any(_new_home(spec) in str(w.message) for w in rec), [str(w.message) for w in rec]


def test_from_01_module_import():
    with pytest.warns(DeprecationWarning, match=r"use gradfn\.conflict\.interference"):
        from gradfn.graph import interference
    e = torch.tensor([[1.0, 0.0], [-1.0, 0.1]])
    assert interference(e @ e.T)[0, 1] > 0.9
    with pytest.warns(DeprecationWarning, match=r"use gradfn\.adapters\.SonGokuScheduler"):
        from gradfn.songoku_scheduler import SonGokuScheduler
    assert SonGokuScheduler is gradfn.SonGokuScheduler
    with pytest.warns(DeprecationWarning, match=r"use gradfn\.integrations\.amp\.unscale"):
        from gradfn.amp import unscale
    assert unscale({"a": torch.ones(1)}, None)["a"].item() == 1.0


# ---------------------------------------------------------------------------------------------
# gradfn.conductor's 0.1 functions, with their 0.1 signatures


def _conductor_module():
    return importlib.import_module("gradfn.conductor")


def _old(name):
    with pytest.warns(DeprecationWarning, match=re.escape(f"gradfn.conductor.{name}")):
        return getattr(_conductor_module(), name)


def test_conductor_01_functions_match_the_02_algorithm():
    params, micro = make_params(), make_batches(2)
    config = _old("make_config")(LAMBDAS, 2, stochastic=False, skip_guard=True)
    tx = conductor(two_losses, config=config)
    grads, losses, raw = _old("accumulate")(config, two_losses, params, micro)
    cycle = tx.accumulate(params, micro)
    assert tree_equal((grads, losses, raw), (cycle.grads, cycle.losses, cycle.raw_losses))
    state = _old("init_state")(config, params)
    assert tree_equal(state, tx.init(params))
    new, out = _old("process")(config, state, grads, losses, raw, params)
    want_state, want = tx.process(tx.init(params), grads, losses, raw, params)
    assert tree_equal(new, want_state) and tree_equal(out, want)
    assert int(new.step) == 1


def test_discard_cycle_keeps_the_old_algorithm_state():
    t = conductor(two_losses, LAMBDAS, accumulation_steps=2, stochastic=False)
    params = make_params()
    state, _ = t.update(t.init(params), params, make_batches(2))
    bad = make_batches(2)
    bad[1] = (bad[1][0].clone(), bad[1][1].clone())
    bad[1][1][0, 0] = float("nan")
    new, _ = t.update(state, params, bad)
    free = conductor(two_losses, LAMBDAS, accumulation_steps=2, stochastic=False, donate_state=True)
    raw_new, _ = free.update(state, params, bad)
    kept = _old("discard_cycle")(state, raw_new)
    for field in ("momentum", "prev", "prev_sq_norms", "norm_ema", "history", "final_grad_norm"):
        assert leaves_equal(getattr(kept, field), getattr(new, field)), field


def test_conductor_skip_guard_option_is_donate_state():
    params, micro = make_params(), make_batches(2)
    with pytest.warns(DeprecationWarning, match="skip_guard"):
        old = conductor(two_losses, LAMBDAS, accumulation_steps=2, skip_guard=False)
    new = conductor(two_losses, LAMBDAS, accumulation_steps=2, donate_state=True)
    a, ga = old.update(old.init(params), params, micro)
    b, gb = new.update(new.init(params), params, micro)
    assert tree_equal((a, ga), (b, gb))


# ---------------------------------------------------------------------------------------------
# SON-GOKU's 0.1 options


@pytest.mark.parametrize(
    ("legacy", "aggregator", "weight_heads"),
    [
        ("pcgrad", aggregators.aggregator("pcgrad", seed=7, reduction="mean"), False),
        ("pcgrad_sum", aggregators.aggregator("pcgrad", seed=7), False),
        ("inverse_norm", aggregators.aggregator("inverse_norm"), True),
        ("adatask", aggregators.aggregator("inverse_norm"), True),
    ],
)
def test_songoku_gradient_transform_names_are_aggregators(legacy, aggregator, weight_heads):
    dirs, _ = planted(k_per_group=2, groups=2)
    kw = dict(num_tasks=4, shared=["w"], refresh_period=2, seed=7)
    with pytest.warns(DeprecationWarning, match="gradient_transform"):
        old = songoku(linear_loss(dirs), gradient_transform=legacy, **kw)
    new = songoku(linear_loss(dirs), aggregator=aggregator, weight_heads=weight_heads, **kw)
    params = sg_params(4)
    s_old, s_new = old.init(params), new.init(params)
    for b in batches(4, 5, scale=0.3):
        s_old, g_old = old.update(s_old, params, b)
        s_new, g_new = new.update(s_new, params, b)
        assert tree_equal(g_old, g_new)
    assert tree_equal(s_old, s_new)
    assert torch.equal(s_new.ptr, s_new.group_index)  # the 0.1 name of the group pointer


def test_songoku_adatask_beta_and_guard_grads():
    dirs, _ = planted(k_per_group=1, groups=3)
    with pytest.warns(DeprecationWarning, match="gradient_transform"):
        old = songoku(
            linear_loss(dirs), num_tasks=3, gradient_transform="adatask", adatask_beta=0.5
        )
    new = songoku(
        linear_loss(dirs),
        num_tasks=3,
        aggregator=aggregators.aggregator("inverse_norm", beta=0.5),
        weight_heads=True,
    )
    params = sg_params(3)
    b = batches(3, 1)[0]
    assert tree_equal(
        old.update(old.init(params), params, b), new.update(new.init(params), params, b)
    )
    with pytest.warns(DeprecationWarning, match="guard_grads"):
        songoku(linear_loss(dirs), num_tasks=3, guard_grads=False)


def test_songoku_bad_gradient_transform():
    f = linear_loss(torch.zeros(2, 6, dtype=torch.float64))
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="gradient_transform"):
        songoku(f, num_tasks=2, gradient_transform="mgda")
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="gradient_transform"):
        songoku(f, num_tasks=2, gradient_transform=3)
    with pytest.raises(TypeError, match="aggregator"):
        songoku(f, num_tasks=2, gradient_transform="pcgrad", aggregator="upgrad")


def test_user_hook_receives_masked_per_task_gradients():
    dirs, _ = planted(k_per_group=1, groups=2)
    calls = []

    def hook(grads, active):
        calls.append((grads["w"].clone(), active.clone()))
        return {"w": 2 * grads["w"]}

    with pytest.warns(DeprecationWarning, match="gradient_transform"):
        tx = songoku(
            linear_loss(dirs), num_tasks=2, shared=["w"], gradient_transform=hook, refresh_period=2
        )
    params = sg_params(2)
    state = tx.init(params)
    data = batches(2, 4)
    for b in data:
        group = state.groups[state.group_index].clone()
        state, grads = tx.update(state, params, b)
        torch.testing.assert_close(grads["w"], 2 * sum((dirs + b)[i] for i in range(2) if group[i]))
    got, active = calls[-1]
    assert torch.equal(got[~active], torch.zeros_like(got[~active]))


# ---------------------------------------------------------------------------------------------
# aggregators' 0.1 in-group hooks


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def test_as_gradient_transforms_warn():
    with pytest.warns(DeprecationWarning, match="as_gradient_transform is deprecated"):
        A.as_gradient_transform("mean")
    with pytest.warns(DeprecationWarning, match="as_stateful_gradient_transform is deprecated"):
        A.as_stateful_gradient_transform("graddrop")


@pytest.mark.parametrize("method", [m for m in A.METHODS if m != "gcond"])
def test_as_gradient_transform_rejects_unknown_hyper_parameters(method, quiet):
    with pytest.raises(TypeError, match="reg_esp"):
        A.as_gradient_transform(method, reg_esp=1e-4)


@pytest.mark.parametrize("method", ["mean", "sum", "upgrad", "mgda", "imtl_g", "config"])
def test_gradient_transform_rows_sum_to_active_aggregate(method, quiet):
    j = jac(7, 5, 12)
    active = torch.tensor([True, False, True, True, False])
    grads = split(j)
    rows = A.as_gradient_transform(method)(grads, active)
    assert bool((rows["a"][~active] == 0).all()) and bool((rows["b"][~active] == 0).all())
    sub = split(j[active])
    agg = A.aggregator(method)
    _, ref = agg.update(agg.init(3), sub)
    torch.testing.assert_close(rows["a"].sum(0), ref.grad["a"])
    torch.testing.assert_close(rows["b"].sum(0), ref.grad["b"])


def test_stateful_gradient_transform_threads_state(quiet):
    with pytest.raises(TypeError, match="as_stateful_gradient_transform"):
        A.as_gradient_transform("gradvac")
    init, transform = A.as_stateful_gradient_transform("graddrop", seed=1)
    j = jac(8, 3, 9)
    state = init(3)
    state, rows = transform(state, {"w": j}, torch.tensor([True, True, False]))
    assert int(state.count) == 1 and bool((rows["w"][2] == 0).all())


# ---------------------------------------------------------------------------------------------
# the 0.2 names warn about nothing

PACKAGES = [
    "adapters",
    "aggregators",
    "algorithms",
    "autodiff",
    "conflict",
    "integrations",
    "integrations.amp",
    "integrations.distributed",
    "integrations.logging",
    "schedules",
    "transforms",
    "tree",
    "typing",
]

NO_WARNING = f"""
import importlib, warnings
import torch, optree  # their own import-time warnings are not gradfn's
warnings.simplefilter("error")
import gradfn
for name in gradfn.__all__:
    getattr(gradfn, name)
for package in {PACKAGES!r}:
    module = importlib.import_module("gradfn." + package)
    for name in getattr(module, "__all__", []):
        getattr(module, name)
print("no warning")
"""


def test_importing_gradfn_and_its_02_names_warns_about_nothing():
    proc = subprocess.run(
        [sys.executable, "-c", NO_WARNING],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0 and "no warning" in proc.stdout, proc.stderr[-3000:]


def test_02_names_warn_about_nothing_in_process():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in gradfn.__all__:
            getattr(gradfn, name)
        for package in PACKAGES:
            module = importlib.import_module(f"gradfn.{package}")
            for name in getattr(module, "__all__", []):
                getattr(module, name)
