"""Adapter checkpoints.

Checkpoints go through ``torch.save`` / ``torch.load(weights_only=True)`` into a FRESH adapter (a new
model instance holding the same weights) and must continue bit-identically; a saved dict must not
change when training goes on. Checkpoints written by gradfn 0.1 (``tests/data``, made by
``tests/data/make_v01_checkpoints.py``) load into the 0.2 adapters: the converted state equals the
0.1 state field by field, and training continues as a 0.2 adapter that ran every step (except
SON-GOKU's in-group PCGrad, whose random orders 0.2 draws differently, as documented). The stored
0.1 trajectories were computed on another CPU, whose kernels round differently in the last bits, so
runs are compared with them to ``V01_TOL`` (observed: ≤ 5e-7 relative); the conversion itself is
compared bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from gradfn import adapters
from gradfn.adapters import GradientConductor, SonGokuScheduler, TauSchedule
from gradfn.aggregators import CounterState, InverseNormState
from gradfn.transforms import EmptyState
from tests._utils.asserts import assert_trees_close, clone_tree, tree_equal
from tests._utils.models import TrunkHeads
from tests.data import make_v01_checkpoints as v01
from tests.unit.adapters._problems import (
    GC_LAMBDAS,
    GC_LOSSES,
    abc_batches,
    abc_specs,
    gc_provider,
)

V01_TOL = 1e-5  # float32 runs of a few steps, recomputed on another CPU than the stored one


def _assert_runs_close(a, b):
    """Two trajectories (lists of step stats, dicts of numbers) agree to ``V01_TOL``."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=V01_TOL, abs=V01_TOL)


# ---------------------------------------------------------------------------------------------
# SonGokuScheduler

SCHED_CONFIGS = {
    "pcgrad-active": dict(base_method="pcgrad", refresh_period=3),
    "refresh-sketch-fmin": dict(
        ema_mode="refresh", sketch_dim=16, min_updates_per_cycle=2, refresh_period=2
    ),
    "legacy-adatask-log": dict(
        legacy_pointer=True,
        base_method="adatask",
        refresh_period=2,
        tau_schedule=TauSchedule("log", 1.0, 0.05, warmup_steps=2, anneal_duration=6),
    ),
}


@pytest.mark.parametrize("name", list(SCHED_CONFIGS))
def test_songoku_scheduler_checkpoint_into_fresh_adapter_is_bit_identical(name, roundtrip):
    kw = {"tau_schedule": TauSchedule("constant", tau_target=-0.2), **SCHED_CONFIGS[name]}
    data = abc_batches(12)

    def build(seed):
        model = TrunkHeads(6, 8, 3, seed=seed)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        return model, opt, SonGokuScheduler(model, abc_specs(), opt, **kw)

    model, opt, sched = build(0)
    for b in data[:5]:
        sched.step(b)
    ckpt = roundtrip({"m": model.state_dict(), "o": opt.state_dict(), "s": sched.state_dict()})
    saved = sched.state_dict()
    frozen = clone_tree(saved)
    ref_losses = [sched.step(b) for b in data[5:]]
    assert tree_equal(saved, frozen), "a later step changed a saved state_dict"

    model2, opt2, sched2 = build(7)  # other initial weights: everything must come from the ckpt
    model2.load_state_dict(ckpt["m"])
    opt2.load_state_dict(ckpt["o"])
    sched2.load_state_dict(ckpt["s"])
    loaded = clone_tree(ckpt["s"])
    new_losses = [sched2.step(b) for b in data[5:]]
    assert tree_equal(ckpt["s"], loaded), "stepping the loaded adapter changed the loaded dict"
    assert new_losses == ref_losses
    assert sched2.schedule_snapshot() == sched.schedule_snapshot()
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert tree_equal(sched.state._asdict(), sched2.state._asdict())


# ---------------------------------------------------------------------------------------------
# GradientConductor

GC_CONFIGS = {
    "stochastic-lion": dict(use_lion=True, dominance_window=2),
    "classic-cap-raw": dict(stochastic_accumulation=False, norm_cap=0.5, return_raw_grad=True),
    "reference-zones": dict(reference=True, use_smooth_logic=False, dominance="wins"),
}


@pytest.mark.parametrize("name", list(GC_CONFIGS))
def test_gradient_conductor_checkpoint_into_fresh_adapter_is_bit_identical(name, roundtrip):
    kw = GC_CONFIGS[name]

    def build(seed):
        model = TrunkHeads(5, 6, 1, out=2, seed=seed)
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, betas=(0.0, 0.99))
        return model, opt, GradientConductor(model, GC_LOSSES, GC_LAMBDAS, 6, **kw)

    def run(model, opt, gc, steps):
        out = []
        for s in steps:
            opt.zero_grad()
            stats = gc.step(gc_provider(s))
            opt.step()
            out.append(stats)
        return out

    model, opt, gc = build(0)
    run(model, opt, gc, range(3))
    ckpt = roundtrip({"m": model.state_dict(), "o": opt.state_dict(), "g": gc.state_dict()})
    saved = gc.state_dict()
    frozen = clone_tree(saved)
    ref = run(model, opt, gc, range(3, 7))
    assert tree_equal(saved, frozen)

    model2, opt2, gc2 = build(9)
    model2.load_state_dict(ckpt["m"])
    opt2.load_state_dict(ckpt["o"])
    gc2.load_state_dict(ckpt["g"])
    loaded = clone_tree(ckpt["g"])
    new = run(model2, opt2, gc2, range(3, 7))
    assert tree_equal(ckpt["g"], loaded)
    assert new == ref
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert tree_equal(gc.state_dict(), gc2.state_dict())


# ---------------------------------------------------------------------------------------------
# checkpoints written by gradfn 0.1


def _load_v01(kind: str, config: str) -> dict:
    ckpt = torch.load(v01.path(kind, config), weights_only=True)
    assert ckpt["gradfn"] == "0.1.0"
    return ckpt


def test_v01_checkpoints_are_small_and_the_generator_wants_gradfn_01():
    files = sorted(v01.HERE.glob("v01_*.pt"))
    expected = [v01.path("songoku", c) for c in v01.SONGOKU_CONFIGS]
    expected += [v01.path("conductor", c) for c in v01.CONDUCTOR_CONFIGS]
    assert files == sorted(expected)
    assert all(f.stat().st_size < 100 * 1024 for f in files)
    with pytest.raises(SystemExit, match=r"0\.1\.0 checkout"):
        v01.main()  # this process imports gradfn 0.2


def _restore(kind: str, config: str, ckpt: dict):
    """Build the 0.1 script's ``kind`` setup and load a 0.1 checkpoint into its three parts."""
    build = v01.build_songoku if kind == "songoku" else v01.build_conductor
    model, opt, adapter = build(adapters, config)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    adapter.load_state_dict(ckpt["adapter"])
    return model, opt, adapter


@pytest.mark.parametrize("config", list(v01.SONGOKU_CONFIGS))
def test_v01_songoku_state_converts_field_by_field(config):
    ckpt = _load_v01("songoku", config)
    saved = ckpt["adapter"]
    core = saved["core"]
    _, _, sched = _restore("songoku", config, ckpt)
    state = sched.state
    assert sched.t == ckpt["steps"] == int(core["step"])
    assert torch.equal(state.group_index, core["ptr"])
    for field in (
        "step",
        "groups",
        "num_groups",
        "ema",
        "ema_count",
        "rho",
        "adjacency",
        "tau",
        "losses",
        "active",
        "skipped",
        "refreshes",
    ):
        assert tree_equal(getattr(state, field), core[field]), field
    assert int(core["refreshes"]) == 1 and int(core["num_groups"]) > 1  # a real schedule
    if config == "vanilla":
        assert state.aggregator == EmptyState()
    elif config == "pcgrad":  # the 0.1 order counter was the step count
        assert tree_equal(state.aggregator, CounterState(core["seed"], core["step"]))
    else:
        assert tree_equal(state.aggregator, InverseNormState(core["norm_ema"]))
        assert bool((core["norm_ema"] > 0).all())
    # the schedule and the parameter roles come back as saved
    assert tree_equal(sched._usage, saved["usage"])
    debug = sched.debug_state()
    assert debug["shared_params"] == saved["shared_params"]
    assert list(debug["head_params"].values()) == saved["head_params"]
    groups = [
        torch.nonzero(core["groups"][g]).flatten().tolist() for g in range(int(core["num_groups"]))
    ]
    assert sched.current_groups() == groups
    # a 0.2 state_dict of the converted state loads back to the same state
    again = v01.build_songoku(adapters, config)[2]
    again.load_state_dict(sched.state_dict())
    assert tree_equal(again.state, sched.state)


@pytest.mark.parametrize("config", list(v01.SONGOKU_CONFIGS))
def test_v01_songoku_checkpoint_continues_like_a_02_run(config):
    ckpt = _load_v01("songoku", config)
    n, more = ckpt["steps"], v01.SONGOKU_MORE
    model, opt, sched = _restore("songoku", config, ckpt)
    resumed = [sched.step(v01.songoku_batch(t)) for t in range(n, n + more)]
    assert sched.t == n + more and int(sched.state.refreshes) == 3  # after steps 3, 6, 9

    if config == "pcgrad":
        # 0.2 draws SON-GOKU's PCGrad orders from its one PRNG (documented): not the 0.1 run's
        # trajectory; the resumed run is still deterministic (a fresh load: torch's optimizer
        # load_state_dict keeps the loaded tensors and the first run moved them)
        model2, _, sched2 = _restore("songoku", config, _load_v01("songoku", config))
        again = [sched2.step(v01.songoku_batch(t)) for t in range(n, n + more)]
        assert again == resumed
        assert tree_equal(model2.state_dict(), model.state_dict())
        assert tree_equal(sched2.state, sched.state)
        return
    # gradfn 0.2 from scratch, the same model init, every step
    ref_model, ref_opt, ref = v01.build_songoku(adapters, config)
    assert tree_equal(ref_model.state_dict(), ckpt["model_init"])
    for t in range(n):
        ref.step(v01.songoku_batch(t))
    # 0.1 and 0.2 trained alike
    assert_trees_close(ref_model.state_dict(), ckpt["model"], V01_TOL)
    expected = [ref.step(v01.songoku_batch(t)) for t in range(n, n + more)]
    _assert_runs_close(resumed, expected)
    assert_trees_close(model.state_dict(), ref_model.state_dict(), V01_TOL)
    assert_trees_close(opt.state_dict()["state"], ref_opt.state_dict()["state"], V01_TOL)
    assert_trees_close(sched.state, ref.state, V01_TOL)
    assert sched.schedule_snapshot() == ref.schedule_snapshot()


@pytest.mark.parametrize("config", list(v01.CONDUCTOR_CONFIGS))
def test_v01_conductor_state_converts_field_by_field(config):
    ckpt = _load_v01("conductor", config)
    saved = ckpt["adapter"]["state"]
    assert "version" not in ckpt["adapter"]  # gradfn 0.1 wrote none
    _, _, gc = _restore("conductor", config, ckpt)
    state = gc.state
    seen = set()

    def check(key, value):
        seen.add(key)
        assert tree_equal(value, saved[key]), key

    check("momentum/0", state.momentum.count)
    for name, mu in state.momentum.mu.items():
        check(f"momentum/1/{name}", mu)
    for name, prev in state.prev.items():
        check(f"prev/{name}", prev)
    for key in (
        "prev_sq_norms",
        "norm_ema",
        "history",
        "losses",
        "raw_losses",
        "raw_norms",
        "proj_iters",
        "min_cosine_sim",
        "min_cosine_after",
        "final_grad_norm",
        "winners",
        "skipped",
        "num_skipped",
    ):
        check(key, getattr(state, key))
    assert seen == set(saved)  # every 0.1 entry has its 0.2 home
    assert int(state.step) == ckpt["steps"] and int(saved["proj_iters"]) >= 0
    assert bool((saved["history"] >= 0).any())  # the arbitrator did decide something


@pytest.mark.parametrize("config", list(v01.CONDUCTOR_CONFIGS))
def test_v01_conductor_checkpoint_continues_like_a_02_run(config):
    ckpt = _load_v01("conductor", config)
    n, more = ckpt["steps"], v01.CONDUCTOR_MORE
    model, opt, gc = _restore("conductor", config, ckpt)
    resumed = [v01.conductor_cycle(model, opt, gc, c) for c in range(n, n + more)]
    ref_model, ref_opt, ref = v01.build_conductor(adapters, config)
    assert tree_equal(ref_model.state_dict(), ckpt["model_init"])
    for c in range(n):
        v01.conductor_cycle(ref_model, ref_opt, ref, c)
    # 0.1 and 0.2 trained alike
    assert_trees_close(ref_model.state_dict(), ckpt["model"], V01_TOL)
    expected = [v01.conductor_cycle(ref_model, ref_opt, ref, c) for c in range(n, n + more)]
    _assert_runs_close(resumed, expected)
    assert_trees_close(model.state_dict(), ref_model.state_dict(), V01_TOL)
    assert_trees_close(opt.state_dict()["state"], ref_opt.state_dict()["state"], V01_TOL)
    assert_trees_close(gc.state, ref.state, V01_TOL)
