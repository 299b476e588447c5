"""SON-GOKU (gradfn.algorithms.songoku) against naive loops written out here."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradfn import aggregators
from gradfn._internal.prng import fold_in, permutations
from gradfn.algorithms import songoku
from gradfn.schedules import TauSchedule
from tests._utils import oracles
from tests.unit.algorithms.songoku._linear import (
    D,
    batches,
    linear_loss,
    make_params,
    partition,
    planted,
)


@pytest.mark.parametrize(
    ("ema_mode", "sketch_dim"), [("active", None), ("refresh", None), ("active", 128)]
)
def test_planted_partition_is_recovered(ema_mode, sketch_dim):
    dirs, labels = planted(k_per_group=3, groups=3)
    k = len(labels)
    tx = songoku(
        linear_loss(dirs),
        num_tasks=k,
        shared=["w"],
        refresh_period=4,
        ema_mode=ema_mode,
        sketch_dim=sketch_dim,
        tau_schedule=0.25,
    )
    params = make_params(k)
    state = tx.init(params)
    for b in batches(k, 4):
        state, _ = tx.update(state, params, b)
    assert int(state.refreshes) == 1
    truth = {frozenset(i for i in range(k) if labels[i] == c) for c in range(3)}
    assert partition(state) == truth
    # the conflict graph is exactly "different clusters"
    expected = torch.tensor([[labels[i] != labels[j] for j in range(k)] for i in range(k)])
    assert torch.equal(state.adjacency, expected)


def test_steps_follow_the_paper_schedule_and_sum_the_active_gradients():
    dirs, labels = planted(k_per_group=2, groups=3)
    k = len(labels)
    loss_fn = linear_loss(dirs)
    tx = songoku(loss_fn, num_tasks=k, shared=["w"], refresh_period=4, tau_schedule=0.25)
    params = make_params(k)
    state = tx.init(params)
    seen = []
    for t, b in enumerate(batches(k, 12)):
        group = state.groups[state.group_index].clone()
        state, grads = tx.update(state, params, b)
        seen.append(frozenset(torch.nonzero(group).flatten().tolist()))
        assert torch.equal(state.active, group)
        # naive: Σ_{k∈S} ∇L_k for w, own-head gradients for active heads, zeros otherwise
        want_w = sum(dirs[i] + b[i] for i in range(k) if group[i])
        torch.testing.assert_close(grads["w"], want_w)
        for i in range(k):
            want_h = (1 + i) * params[f"h{i}"] if group[i] else torch.zeros(2, dtype=torch.float64)
            torch.testing.assert_close(grads[f"h{i}"], want_h)
        assert int(state.step) == t + 1
    every = frozenset(range(k))
    assert seen[:4] == [every] * 4  # warm-up: joint training until the first refresh (t = R)
    g0, g1, g2 = (frozenset(p) for p in ([0, 1], [2, 3], [4, 5]))
    # each refresh window starts again at group 0 (spec §5.6 fixed): 0,1,2,0 | 0,1,2,0
    assert seen[4:] == [g0, g1, g2, g0, g0, g1, g2, g0]


def test_legacy_pointer_starts_the_window_at_group_one():
    dirs, _ = planted(k_per_group=1, groups=3)
    tx = songoku(
        linear_loss(dirs), num_tasks=3, shared=["w"], refresh_period=2, legacy_pointer=True
    )
    params = make_params(3)
    state = tx.init(params)
    for b in batches(3, 2):
        state, _ = tx.update(state, params, b)
    assert int(state.group_index) == 1


def test_mean_reduction_and_one_backward_path():
    dirs, labels = planted(k_per_group=2, groups=2)
    k = len(labels)
    loss_fn = linear_loss(dirs)
    params = make_params(k)
    for reduction in ("sum", "mean"):
        tx = songoku(
            loss_fn,
            num_tasks=k,
            shared=["w"],
            refresh_period=2,
            ema_mode="refresh",
            reduction=reduction,
        )
        assert tx.config.one_backward
        state = tx.init(params)
        for b in batches(k, 5):
            group = state.groups[state.group_index].clone()
            state, grads = tx.update(state, params, b)
            n = int(group.sum()) if reduction == "mean" else 1
            want = sum(dirs[i] + b[i] for i in range(k) if group[i]) / n
            torch.testing.assert_close(grads["w"], want)
        assert len(partition(state)) == 2


def test_ema_modes_match_a_naive_ema():
    dirs, labels = planted(k_per_group=2, groups=2)
    k = len(labels)
    params = make_params(k)
    data = batches(k, 6, scale=0.3)
    beta = 0.8
    for mode in ("active", "refresh"):
        tx = songoku(
            linear_loss(dirs),
            num_tasks=k,
            shared=["w"],
            refresh_period=3,
            ema_mode=mode,
            ema_beta=beta,
        )
        state = tx.init(params)
        ema = torch.zeros(k, D, dtype=torch.float64)
        for t, b in enumerate(data):
            group = state.groups[state.group_index].clone()
            state, _ = tx.update(state, params, b)
            g = dirs + b
            update = group if mode == "active" else torch.full((k,), (t + 1) % 3 == 0)
            ema = oracles.masked_ema(ema, g, update, beta)
        torch.testing.assert_close(state.ema["w"], ema)


def test_refresh_batch_updates_the_ema_of_probed_tasks():
    dirs, _ = planted(k_per_group=1, groups=3)
    tx = songoku(linear_loss(dirs), num_tasks=3, shared=["w"], refresh_period=5)
    params = make_params(3)
    state = tx.init(params)
    extra = torch.ones(3, D, dtype=torch.float64)
    probe = torch.tensor([True, False, True])
    new = tx.refresh(state, params, extra, probe)
    want = 0.1 * (dirs + extra)
    torch.testing.assert_close(new.ema["w"][0], want[0])
    torch.testing.assert_close(new.ema["w"][1], torch.zeros(D, dtype=torch.float64))
    torch.testing.assert_close(new.ema["w"][2], want[2])
    assert new.ema_count.tolist() == [1, 0, 1]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_pcgrad_in_group_matches_naive(reduction):
    g = torch.Generator().manual_seed(3)
    dirs = torch.randn(4, D, generator=g, dtype=torch.float64)
    tx = songoku(
        linear_loss(dirs),
        num_tasks=4,
        shared=["w"],
        aggregator=aggregators.aggregator("pcgrad", seed=7, reduction=reduction),
        refresh_period=100,
    )
    params = make_params(4)
    state = tx.init(params)
    for b in batches(4, 3, scale=0.5):
        agg = state.aggregator  # the in-group PCGrad's seed and call counter
        order = permutations(fold_in(agg.seed, agg.count), 4, 4)
        active = state.groups[state.group_index].clone()
        state, grads = tx.update(state, params, b)
        want = oracles.pcgrad(dirs + b, active, order, mean=reduction == "mean")
        torch.testing.assert_close(grads["w"], want)
        torch.testing.assert_close(grads["h1"], 2 * params["h1"])  # heads untouched
    assert int(state.aggregator.seed) == 7 and int(state.aggregator.count) == 3


def test_inverse_norm_weighting_matches_naive():
    g = torch.Generator().manual_seed(4)
    dirs = torch.randn(3, D, generator=g, dtype=torch.float64) * torch.tensor(
        [[1.0], [3.0], [9.0]], dtype=torch.float64
    )
    tx = songoku(
        linear_loss(dirs),
        num_tasks=3,
        shared=["w"],
        aggregator=aggregators.aggregator("inverse_norm"),
        weight_heads=True,
        refresh_period=100,
    )
    params = make_params(3)
    state = tx.init(params)
    ema = [None] * 3
    for b in batches(3, 3, scale=0.5):
        state, grads = tx.update(state, params, b)
        gs = dirs + b
        w = oracles.inverse_norm_weights([float(x.norm()) for x in gs], [True] * 3, ema)
        # float64 gradients: the norm EMA is float64 too
        want = sum(w[i] * gs[i] for i in range(3))
        torch.testing.assert_close(grads["w"], want, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grads["h2"], w[2] * 3 * params["h2"], rtol=1e-12, atol=1e-14)


def test_non_finite_loss_skips_the_step_without_touching_the_state():
    dirs, _ = planted(k_per_group=1, groups=2)
    for mode in ("active", "refresh"):
        tx = songoku(linear_loss(dirs), num_tasks=2, shared=["w"], refresh_period=3, ema_mode=mode)
        params = make_params(2)
        state = tx.init(params)
        state, _ = tx.update(state, params, batches(2, 1)[0])
        bad = torch.full((2, D), float("nan"), dtype=torch.float64)
        new, grads = tx.update(state, params, bad)
        assert bool(new.skipped)
        assert all(bool((g == 0).all()) for g in grads.values())
        for name in ("step", "group_index", "groups", "ema_count"):
            assert torch.equal(getattr(new, name), getattr(state, name)), name
        assert torch.equal(new.ema["w"], state.ema["w"])
        again, _ = tx.update(new, params, batches(2, 1, seed=5)[0])
        assert not bool(again.skipped) and int(again.step) == 2


@given(st.integers(2, 8), st.sampled_from([0.0, 0.2, 0.5]), st.integers(0, 10_000))
def test_descent_bound_holds_on_every_colour_group(k, tau, seed):
    """§2.3: within a τ-compatible group ‖Σ g‖² ≥ (1 − τ(|S|−1)) Σ ‖g‖²."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(k, D, generator=g, dtype=torch.float64)
    tx = songoku(
        linear_loss(dirs),
        num_tasks=k,
        shared=["w"],
        refresh_period=1,
        ema_beta=0.0,
        tau_schedule=tau,
    )
    params = make_params(k)
    state = tx.init(params)
    zero = torch.zeros(k, D, dtype=torch.float64)
    state, _ = tx.update(state, params, zero)  # refresh on the exact gradients (β = 0)
    for _ in range(int(state.num_groups)):
        group = state.groups[state.group_index].clone()
        state, grads = tx.step(state, params, zero)
        members = dirs[group]
        lhs = float(grads["w"] @ grads["w"])
        rhs = (1 - tau * (len(members) - 1)) * float((members**2).sum())
        assert lhs >= rhs - 1e-9


def test_tau_warmup_means_joint_training_and_the_schedule_is_used_at_refresh():
    dirs, _ = planted(k_per_group=1, groups=3)
    sched = TauSchedule(
        "linear", tau_initial=1.0, tau_target=0.25, warmup_steps=4, anneal_duration=4
    )
    tx = songoku(linear_loss(dirs), num_tasks=3, shared=["w"], refresh_period=2, tau_schedule=sched)
    params = make_params(3)
    state = tx.init(params)
    taus = []
    for b in batches(3, 8):
        state, _ = tx.update(state, params, b)
        if int(state.step) % 2 == 0:
            taus.append(round(float(state.tau), 6))
            if int(state.step) < 4:
                assert int(state.num_groups) == 1
    assert taus == [1.0, round(1.0 - 0.75 * 0, 6), round(1.0 - 0.75 * 0.5, 6), 0.25]
    assert int(state.num_groups) == 3


def test_bad_arguments():
    f = linear_loss(torch.zeros(2, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_tasks"):
        songoku(f, num_tasks=0)
    with pytest.raises(ValueError, match="refresh_period"):
        songoku(f, num_tasks=2, refresh_period=0)
    with pytest.raises(ValueError, match="ema_beta"):
        songoku(f, num_tasks=2, ema_beta=1.0)
    with pytest.raises(ValueError, match="ema_mode"):
        songoku(f, num_tasks=2, ema_mode="always")
    with pytest.raises(ValueError, match="graph_rule"):
        songoku(f, num_tasks=2, graph_rule="cosine")
    with pytest.raises(ValueError, match="min_updates_per_cycle"):
        songoku(f, num_tasks=2, min_updates_per_cycle=0)
    with pytest.raises(TypeError, match="tau_schedule"):
        songoku(f, num_tasks=2, tau_schedule="log")
    with pytest.raises(ValueError, match="density"):
        songoku(f, num_tasks=2, graph_density=2.0)
    tx = songoku(f, num_tasks=2, shared=["nope"])
    with pytest.raises(ValueError, match="shared"):
        tx.init(make_params(2))


@pytest.mark.parametrize("ema_mode", ["refresh", "active"])
def test_per_step_path_compiles_fullgraph(ema_mode):
    torch._dynamo.reset()
    dirs, _ = planted(k_per_group=1, groups=3)
    tx = songoku(linear_loss(dirs), num_tasks=3, shared=["w"], refresh_period=2, ema_mode=ema_mode)
    params = make_params(3)
    state = tx.init(params)
    data = batches(3, 2)
    state, _ = tx.update(state, params, data[0])
    state, _ = tx.update(state, params, data[1])  # refreshed: three groups
    compiled = torch.compile(tx.step, fullgraph=True, backend="aot_eager")
    s_c, g_c = compiled(state, params, data[0])
    s_e, g_e = tx.step(state, params, data[0])
    for a, b in zip(
        torch.utils._pytree.tree_leaves((s_c, g_c)),
        torch.utils._pytree.tree_leaves((s_e, g_e)),
        strict=True,
    ):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("ema_mode", ["active", "refresh"])
def test_donated_state_gives_the_same_trajectory(ema_mode):
    dirs, _ = planted()
    k = dirs.shape[0]
    kw = dict(num_tasks=k, shared=["w"], refresh_period=3, tau_schedule=0.2, ema_mode=ema_mode)
    plain = songoku(linear_loss(dirs), **kw)
    donated = songoku(linear_loss(dirs), donate_state=True, **kw)
    params = make_params(k)
    s1, s2 = plain.init(params), donated.init(params)
    for b in batches(k, 10):
        s1, g1 = plain.update(s1, params, b)
        s2, g2 = donated.update(s2, params, b)
        for n in g1:
            torch.testing.assert_close(g1[n], g2[n])
    for a, b in zip(s1, s2, strict=True):
        if isinstance(a, dict):
            for n in a:
                torch.testing.assert_close(a[n], b[n])
        else:
            torch.testing.assert_close(a, b)


def test_donated_state_is_unchanged_by_a_skipped_step():
    dirs, _ = planted()
    k = dirs.shape[0]
    tx = songoku(linear_loss(dirs), num_tasks=k, shared=["w"], donate_state=True)
    params = make_params(k)
    state, _ = tx.step(tx.init(params), params, batches(k, 1)[0])
    ema_before = state.ema["w"].clone()
    bad = batches(k, 1)[0]
    bad[0, 0] = float("nan")
    state2, _ = tx.step(state, params, bad)
    assert bool(state2.skipped)
    assert torch.equal(state2.ema["w"], ema_before)


def test_threshold_is_compared_in_the_precision_of_a_float64_ema():
    # ρ_01 = 0.30000001 > τ = 0.3 in float64; both round to the same float32 number
    c = 0.30000001
    dirs = torch.zeros(2, D, dtype=torch.float64)
    dirs[0, 0] = 1.0
    dirs[1, 0], dirs[1, 1] = -c, (1 - c * c) ** 0.5
    tx = songoku(linear_loss(dirs), num_tasks=2, shared=["w"], refresh_period=1, tau_schedule=0.3)
    params = make_params(2)
    state, _ = tx.update(tx.init(params), params, torch.zeros(2, D, dtype=torch.float64))
    e = state.ema["w"]
    rho = -float(e[0] @ e[1]) / ((float(e[0].norm()) + 1e-12) * (float(e[1].norm()) + 1e-12))
    assert rho > 0.3 and torch.tensor(rho, dtype=torch.float32) == torch.tensor(0.3)
    assert partition(state) == {frozenset({0}), frozenset({1})}
    assert state.rho.dtype == torch.float32 and state.tau.dtype == torch.float32
