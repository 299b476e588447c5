"""``gradfn.integrations.logging``: the algorithms' states as flat ``{key: float}`` dicts.

Every value is checked against the state read by hand, on small runs of both algorithms through
the functional API and through the adapters (whose own reports, ``GradientConductor.step``'s
stats and ``SonGokuScheduler.debug_state()``, must agree where the quantity is the same); each
call reads the host once (one ``.tolist()``, no ``.item()``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gradfn
from gradfn import aggregators
from gradfn.adapters import GradientConductor, SonGokuScheduler, TauSchedule
from gradfn.algorithms import conductor, songoku
from gradfn.integrations import logging as gl
from gradfn.integrations.logging import aggregated_metrics, conductor_metrics, songoku_metrics
from tests._utils.models import TrunkHeads
from tests._utils.problems import fn_batch, fn_loss, fn_params
from tests.unit.adapters._problems import GC_LAMBDAS, GC_LOSSES, abc_batches, abc_specs, gc_provider
from tests.unit.algorithms.conductor import _problem as cp
from tests.unit.algorithms.songoku._linear import batches, linear_loss, make_params, planted

NAMES6 = [f"task{i}" for i in range(6)]


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _assert_dicts(got: dict[str, float], want: dict[str, float]) -> None:
    assert list(got) == list(want)
    assert all(type(v) is float for v in got.values())
    bad = {k: (got[k], want[k]) for k in want if not _same(got[k], float(want[k]))}
    assert not bad, bad


# ---------------------------------------------------------------------------------------------
# the state read by hand


def _songoku_by_hand(state, names, prefix="songoku/"):
    k = len(names)
    rho = state.rho.tolist()
    off = [rho[i][j] for i in range(k) for j in range(k) if i != j]
    worst = max(off) if off and int(state.refreshes) > 0 else math.nan
    adj = state.adjacency.tolist()
    sq = [0.0] * k
    for leaf in gradfn.tree.leaves(state.ema):
        for i in range(k):
            sq[i] += float(leaf[i].double().pow(2).sum())
    want = {
        "step": int(state.step),
        "group_index": int(state.group_index),
        "num_groups": int(state.num_groups),
        "refreshes": int(state.refreshes),
        "skipped": float(bool(state.skipped)),
        "tau": float(state.tau),
        "conflict_edges": sum(adj[i][j] for i in range(k) for j in range(i + 1, k)),
        "max_interference": worst,
        "min_cosine": -worst,
        "num_active": int(state.active.sum()),
    }
    for key, vals in [
        ("loss", state.losses.tolist()),
        ("active", [float(a) for a in state.active.tolist()]),
        ("ema_norm", [math.sqrt(s) for s in sq]),
        ("ema_count", state.ema_count.tolist()),
    ] + (
        [("aggregator_norm_ema", state.aggregator.norm_ema.tolist())]
        if isinstance(state.aggregator, aggregators.InverseNormState)
        else []
    ):
        want.update({f"{key}/{n}": v for n, v in zip(names, vals, strict=True)})
    return {prefix + key: v for key, v in want.items()}


def _conductor_by_hand(state, names, prefix="gcond/"):
    want = {
        "final_grad_norm": float(state.final_grad_norm),
        "step": int(state.step),
        "proj_iters": int(state.proj_iters),
        "min_cosine_sim": float(state.min_cosine_sim),
        "min_cosine_after": float(state.min_cosine_after),
        "skipped": float(bool(state.skipped)),
        "num_skipped": int(state.num_skipped),
    }
    per = [("loss", state.losses), ("raw_loss", state.raw_losses), ("raw_norm", state.raw_norms)]
    if len(names) > 1:
        per.append(("norm_ema", state.norm_ema))
    for key, vals in per:
        want.update({f"{key}/{n}": float(vals[i]) for i, n in enumerate(names)})
    return {prefix + key: v for key, v in want.items()}


# ---------------------------------------------------------------------------------------------
# SON-GOKU


def _songoku_run(steps=7, **options):
    dirs, _ = planted(k_per_group=2, groups=3, seed=0, noise=0.1)
    tx = songoku(
        linear_loss(dirs),
        num_tasks=6,
        shared=["w"],
        refresh_period=3,
        tau_schedule=0.25,
        **options,
    )
    params = make_params(6)
    state = tx.init(params)
    for b in batches(6, steps, scale=0.3):
        state, _ = tx.update(state, params, b)
    return tx, state


@pytest.mark.parametrize(
    "options",
    [{}, {"aggregator": "inverse_norm"}, {"sketch_dim": 4}],
    ids=["sum", "inverse-norm", "sketch"],
)
def test_songoku_metrics_equal_the_state_read_by_hand(options):
    _, state = _songoku_run(**options)
    assert int(state.refreshes) > 0 and int(state.num_groups) > 1  # decisions were taken
    got = songoku_metrics(state, NAMES6)
    _assert_dicts(got, _songoku_by_hand(state, NAMES6))
    assert ("songoku/aggregator_norm_ema/task0" in got) == ("aggregator" in options)
    assert got["songoku/min_cosine"] < 1.0 and got["songoku/conflict_edges"] > 0


def test_songoku_metrics_before_the_first_refresh_and_with_one_task():
    tx, _ = _songoku_run(steps=0)
    init = tx.init(make_params(6))
    got = songoku_metrics(init)
    _assert_dicts(got, _songoku_by_hand(init, [str(i) for i in range(6)]))
    assert math.isnan(got["songoku/tau"]) and math.isnan(got["songoku/max_interference"])

    dirs, _ = planted(k_per_group=1, groups=1)
    one = songoku(linear_loss(dirs), num_tasks=1, shared=["w"], refresh_period=1)
    params = make_params(1)
    state = one.init(params)
    for b in batches(1, 3):
        state, _ = one.update(state, params, b)
    got = songoku_metrics(state, ["only"], prefix="")
    assert int(state.refreshes) > 0 and math.isnan(got["max_interference"])
    _assert_dicts(got, _songoku_by_hand(state, ["only"], prefix=""))


def test_songoku_metrics_of_a_skipped_step_report_the_nan_loss():
    tx, state = _songoku_run(steps=4)
    params = make_params(6)
    bad = batches(6, 1)[0]
    bad[2] = float("nan")
    state, _ = tx.update(state, params, bad)
    got = songoku_metrics(state)
    assert got["songoku/skipped"] == 1.0 and math.isnan(got["songoku/loss/2"])
    _assert_dicts(got, _songoku_by_hand(state, [str(i) for i in range(6)]))


def test_songoku_metrics_of_the_scheduler_agree_with_debug_state():
    model = TrunkHeads(6, 8, 3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = SonGokuScheduler(
        model,
        abc_specs(),
        opt,
        refresh_period=2,
        tau_schedule=TauSchedule("constant", tau_target=-0.2),
        base_method="adatask",
    )
    with pytest.raises(TypeError, match="`state`"):
        songoku_metrics(sched.state)  # None before the first step
    for b in abc_batches(5):
        opt.zero_grad()
        sched.step(b)
        opt.step()
    got = songoku_metrics(sched.state, sched.names, prefix="")
    _assert_dicts(got, _songoku_by_hand(sched.state, sched.names, prefix=""))
    dbg = sched.debug_state()
    assert got["step"] == dbg["t"]
    assert got["group_index"] == dbg["step_in_cycle"]
    assert got["num_groups"] == dbg["schedule_len"]
    assert got["skipped"] == float(dbg["skipped"])
    assert got["tau"] == pytest.approx(dbg["last_tau_value"])
    edges = sum(len(v) for v in dbg["conflict_graph"].values()) // 2
    assert got["conflict_edges"] == edges
    for name, norm in dbg["ema_norms"].items():
        assert got[f"ema_norm/{name}"] == pytest.approx(norm, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# GradientConductor


def test_conductor_metrics_equal_the_state_read_by_hand():
    tx = conductor(cp.conflicting_losses, cp.LAMBDAS, accumulation_steps=2)
    params = cp.make_params()
    state = tx.init(params)
    data = cp.make_batches(8)
    for i in range(4):
        state, _ = tx.update(state, params, data[2 * i : 2 * i + 2])
    got = conductor_metrics(state, ["fit", "anti"])
    _assert_dicts(got, _conductor_by_hand(state, ["fit", "anti"]))
    assert got["gcond/step"] == 4.0 and -1.0 <= got["gcond/min_cosine_sim"] <= 1.0


def test_conductor_metrics_of_a_skipped_cycle_report_the_nan_loss():
    tx = conductor(fn_loss, [1.0, 1.0, 1.0], accumulation_steps=1, stochastic=False)
    params = fn_params()
    state = tx.init(params)
    state, _ = tx.update(state, params, [fn_batch(0)])
    state, _ = tx.update(state, params, [fn_batch(1, bad=float("nan"), task=1)])
    got = conductor_metrics(state)
    assert got["gcond/skipped"] == 1.0 and got["gcond/num_skipped"] == 1.0
    assert math.isnan(got["gcond/loss/1"]) and got["gcond/step"] == 1.0
    _assert_dicts(got, _conductor_by_hand(state, ["0", "1", "2"]))


@pytest.mark.parametrize("losses", [list(GC_LOSSES), ["fit"]], ids=["three", "one"])
def test_conductor_metrics_of_the_adapter_contain_its_step_stats(losses):
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(5, 2)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    model = Two()
    gc = GradientConductor(
        model,
        {n: GC_LOSSES[n] for n in losses},
        {n: GC_LAMBDAS[n] for n in losses},
        accumulation_steps=3,
    )
    for step in range(3):
        stats = gc.step(gc_provider(step))
    got = conductor_metrics(gc.state, gc.loss_names, prefix="")
    _assert_dicts(got, _conductor_by_hand(gc.state, gc.loss_names, prefix=""))
    assert set(stats) <= set(got)
    assert all(got[k] == float(v) for k, v in stats.items())


# ---------------------------------------------------------------------------------------------
# aggregators


@pytest.mark.parametrize("method", ["upgrad", "mgda", "graddrop"])
def test_aggregated_metrics_equal_the_output_read_by_hand(method):
    g = torch.Generator().manual_seed(0)
    grads = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(3, 2, 2, generator=g)}
    agg = aggregators.aggregator(method)
    _, out = agg.update(agg.init(3), grads)
    got = aggregated_metrics(out, ["x", "y", "z"], prefix="agg/")
    norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in out.grad.values()))
    want = {"agg/grad_norm": norm} | {
        f"agg/weight/{n}": float(out.weights[i]) for i, n in enumerate("xyz")
    }
    assert list(got) == list(want)
    assert got["agg/grad_norm"] == pytest.approx(norm, rel=1e-12)
    assert all(got[k] == want[k] for k in want if k != "agg/grad_norm")
    assert list(aggregated_metrics(out)) == ["aggregator/grad_norm"] + [
        f"aggregator/weight/{i}" for i in range(3)
    ]


# ---------------------------------------------------------------------------------------------
# names, prefix, errors, host reads


def test_default_names_are_indices_and_the_prefix_is_prepended():
    _, state = _songoku_run(steps=2)
    plain = songoku_metrics(state, prefix="")
    named = songoku_metrics(state, NAMES6, prefix="run1/sg.")
    assert all(k.startswith("run1/sg.") for k in named)
    assert [k.replace("run1/sg.", "", 1) for k in named] == [
        k.replace("/", "/task", 1) if "/" in k else k for k in plain
    ]
    assert "loss/5" in plain and "loss/task5" in songoku_metrics(state, tuple(NAMES6), prefix="")


def test_errors_name_the_argument():
    _, state = _songoku_run(steps=1)
    agg = aggregators.aggregator("mean")
    _, out = agg.update(agg.init(2), {"w": torch.ones(2, 3)})
    ct = conductor(cp.two_losses, cp.LAMBDAS, accumulation_steps=1, stochastic=False)
    cstate = ct.init(cp.make_params())
    with pytest.raises(TypeError, match=r"`state`.*SonGokuState"):
        songoku_metrics(cstate)
    with pytest.raises(TypeError, match=r"`state`.*ConductorState"):
        conductor_metrics(state)
    with pytest.raises(TypeError, match="`aggregated`"):
        aggregated_metrics(out.weights)
    with pytest.raises(ValueError, match="`task_names` has 2 names for 6 tasks"):
        songoku_metrics(state, ["a", "b"])
    with pytest.raises(ValueError, match="`task_names` has 3 names for 2 tasks"):
        conductor_metrics(cstate, ["a", "b", "c"])
    with pytest.raises(ValueError, match="`task_names` has duplicates"):
        aggregated_metrics(out, ["a", "a"])
    with pytest.raises(TypeError, match="`task_names`"):
        aggregated_metrics(out, "ab")
    with pytest.raises(TypeError, match="`task_names` must hold str"):
        conductor_metrics(cstate, [0, 1])
    with pytest.raises(TypeError, match="`prefix`"):
        songoku_metrics(state, prefix=None)
    with pytest.raises(ValueError, match=r"`aggregated\.weights`"):
        aggregated_metrics(out._replace(weights=torch.ones(2, 2)))


class _CountScalarReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def test_one_host_read_per_call(monkeypatch):
    _, sstate = _songoku_run(steps=4, aggregator="inverse_norm")
    ct = conductor(cp.two_losses, cp.LAMBDAS, accumulation_steps=1, stochastic=False)
    params = cp.make_params()
    cstate, _ = ct.update(ct.init(params), params, cp.make_batches(1))
    agg = aggregators.aggregator("upgrad")
    _, out = agg.update(agg.init(2), {"w": torch.randn(2, 3), "b": torch.randn(2)})
    tolist_calls = []
    real = torch.Tensor.tolist

    def counting(self):
        tolist_calls.append(self.shape)
        return real(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    for call in (
        lambda: songoku_metrics(sstate, NAMES6),
        lambda: conductor_metrics(cstate),
        lambda: aggregated_metrics(out),
    ):
        tolist_calls.clear()
        with _CountScalarReads() as mode:
            got = call()
        assert mode.reads == 0, "a value was read with .item() / float() / int() / bool()"
        assert tolist_calls == [torch.Size([len(got)])]


def test_public_names():
    assert gradfn.songoku_metrics is gl.songoku_metrics is gradfn.integrations.songoku_metrics
    assert gradfn.conductor_metrics is gl.conductor_metrics
    assert gradfn.aggregated_metrics is gl.aggregated_metrics
    assert set(gl.__all__) <= set(gradfn.integrations.__all__)
