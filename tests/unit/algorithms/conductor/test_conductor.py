"""GradientConductor end to end (gradfn.algorithms.conductor): resolution and momentum against
by-hand loops, statistics, skip-on-non-finite, loss scaling, the cross-rank reducer, compile."""

from __future__ import annotations

import math

import pytest
import torch

from gradfn import tree
from gradfn.algorithms import conductor, reference_options
from gradfn.conflict import init_history, resolve
from tests._utils.asserts import clone_tree, leaves_equal, tree_equal
from tests.unit.algorithms.conductor._problem import (
    LAMBDAS,
    accumulate,
    conflicting_losses,
    grad_of,
    make_batches,
    make_params,
    two_losses,
)


def test_one_loss_equals_plain_accumulation_plus_momentum():
    beta, n = 0.7, 3
    t = conductor(
        lambda p, b: [two_losses(p, b)[0]], [2.0], accumulation_steps=n, momentum_beta=beta
    )
    params = make_params()
    state = t.init(params)
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    for step in range(1, 4):
        batches = make_batches(n, seed=10 + step)
        state, out = t.update(state, params, batches)
        g = {k: torch.zeros_like(v) for k, v in params.items()}
        for b in batches:
            gb, _ = grad_of(0, params, b)
            g = {k: g[k] + 2.0 * gb[k] / n for k in g}
        m = {k: beta * m[k] + (1 - beta) * g[k] for k in m}
        for k in params:
            assert torch.allclose(out[k], m[k] / (1 - beta**step), atol=1e-6)
        assert int(state.step) == step and int(state.proj_iters) == 0
        assert float(state.min_cosine_sim) == 1.0
        params = {k: v - 0.1 * out[k] for k, v in params.items()}


def test_return_raw_grad_is_the_resolved_sum_and_momentum_still_advances():
    params, batches = make_params(scale=0.1), make_batches(2)
    raw = conductor(
        conflicting_losses, LAMBDAS, accumulation_steps=2, stochastic=False, return_raw_grad=True
    )
    s, g = raw.update(raw.init(params), params, batches)
    acc, _, _ = accumulate(conflicting_losses, params, batches, stochastic=False)
    norms = torch.sqrt(torch.diagonal(tree.gramian(acc)))
    res = resolve(acc, norm_ema=0.95 + 0.05 * norms, history=init_history(3))
    assert int(res.iterations) > 0 and int(s.proj_iters) == int(res.iterations)
    want = {k: v.sum(0) for k, v in res.grads.items()}
    assert all(torch.allclose(g[k], want[k], atol=1e-5) for k in g)
    assert int(s.step) == 1 and not torch.equal(s.momentum.mu["w"], torch.zeros(3, 4))


def test_conflicting_losses_are_resolved_and_stats_recorded():
    def conflict(p, batch):
        x, y = batch
        out = x @ p["w"].T + p["b"]
        return [((out - y) ** 2).mean(), ((out + y) ** 2).mean() * 0.5]

    t = conductor(conflict, [1.0, 1.0], accumulation_steps=2, stochastic=False)
    params = make_params(scale=0.1)  # outputs near 0: the two losses pull in opposite directions
    state = t.init(params)
    state, g = t.update(state, params, make_batches(2))
    assert float(state.min_cosine_sim) < -0.5  # true minimum, strongly conflicting
    assert int(state.proj_iters) >= 1
    assert float(state.min_cosine_after) > float(state.min_cosine_sim)
    assert int((state.winners >= 0).sum()) >= 1
    assert float(state.final_grad_norm) == pytest.approx(float(tree.tree_norm(g)), rel=1e-6)
    ref = conductor(
        conflict, [1.0, 1.0], accumulation_steps=2, stochastic=False, min_cosine="reference"
    )
    s2, _ = ref.update(ref.init(params), params, make_batches(2))
    assert float(s2.min_cosine_sim) == pytest.approx(float(state.min_cosine_sim))
    # a non-conflicting cycle: the reference's stat says 1.0, ours the true minimum
    easy = conductor(lambda p, b: [two_losses(p, b)[0]] * 2, [1.0, 1.0], accumulation_steps=2)
    s3, _ = easy.update(easy.init(params), params, make_batches(2))
    ref3 = conductor(
        lambda p, b: [two_losses(p, b)[0]] * 2,
        [1.0, 1.0],
        accumulation_steps=2,
        min_cosine="reference",
    )
    s4, _ = ref3.update(ref3.init(params), params, make_batches(2))
    # (stochastic mode: the two copies of the loss see different micro-batches)
    assert 0.0 < float(s3.min_cosine_sim) < 1.0 and float(s4.min_cosine_sim) == 1.0


def test_stability_source_raw_vs_processed():
    def conflict(p, batch):
        x, y = batch
        out = x @ p["w"].T + p["b"]
        return [((out - y) ** 2).mean(), ((out + y) ** 2).mean()]

    params = make_params(scale=0.1)
    states = {}
    for src in ("raw", "processed"):
        t = conductor(
            conflict, [1.0, 1.0], accumulation_steps=2, stochastic=False, stability_source=src
        )
        s, _ = t.update(t.init(params), params, make_batches(2))
        states[src] = s
    acc, _, _ = accumulate(conflict, params, make_batches(2), [1.0, 1.0], stochastic=False)
    assert all(torch.allclose(states["raw"].prev[k], acc[k]) for k in acc)
    assert not torch.allclose(states["processed"].prev["w"], acc["w"])
    assert torch.allclose(states["raw"].prev_sq_norms, torch.diagonal(tree.gramian(acc)), rtol=1e-5)


def test_non_finite_gradient_skips_the_cycle():
    t = conductor(two_losses, LAMBDAS, accumulation_steps=2, stochastic=False)
    params = make_params()
    state, _ = t.update(t.init(params), params, make_batches(2))
    bad = make_batches(2)
    bad[1] = (bad[1][0].clone(), bad[1][1].clone())
    bad[1][1][0, 0] = float("nan")
    new, g = t.update(state, params, bad)
    assert bool(new.skipped) and int(new.num_skipped) == 1
    for field in ("momentum", "prev", "prev_sq_norms", "norm_ema", "history"):
        assert leaves_equal(getattr(new, field), getattr(state, field)), field
    assert all(torch.equal(v, torch.zeros_like(v)) for v in g.values())
    after, _ = t.update(new, params, make_batches(2))
    assert not bool(after.skipped) and int(after.step) == 2 and int(after.num_skipped) == 1
    inf = make_batches(2)
    inf[0] = (inf[0][0] * float("inf"), inf[0][1])
    s_inf, _ = t.update(state, params, inf)
    assert bool(s_inf.skipped) and int(s_inf.step) == 1
    # a donated state: the skip is decided on the host, the old algorithm state is kept as is
    free = conductor(two_losses, LAMBDAS, accumulation_steps=2, stochastic=False, donate_state=True)
    raw_new, g_free = free.update(state, params, bad)
    assert bool(raw_new.skipped) and int(raw_new.step) == 1
    assert raw_new.inner.inner is state.inner.inner
    assert all(torch.equal(v, torch.zeros_like(v)) for v in g_free.values())
    for field in ("momentum", "prev", "prev_sq_norms", "norm_ema", "history", "final_grad_norm"):
        assert leaves_equal(getattr(raw_new, field), getattr(new, field)), field


@pytest.mark.parametrize("stochastic", [False, True])
def test_loss_scale_is_exact_and_an_overflow_is_skipped(stochastic):
    # a power-of-two scale: scaling the losses and unscaling the sums is exact, bit for bit
    t = conductor(conflicting_losses, LAMBDAS, accumulation_steps=2, stochastic=stochastic)
    params = make_params()
    state = t.init(params)
    plain = scaled = state
    for c in range(3):
        plain, g_plain = t.update(plain, params, make_batches(2, seed=c))
        scaled, g_scaled = t.update(
            scaled, params, make_batches(2, seed=c), loss_scale=torch.tensor(2.0**12)
        )
        assert leaves_equal(scaled, plain)
        assert all(torch.equal(g_scaled[k], g_plain[k]) for k in g_plain)
    # a scale that overflows float32 in the backward: skipped, state unchanged, zeros out
    over, g = t.update(plain, params, make_batches(2, seed=9), loss_scale=torch.tensor(2.0**127))
    assert bool(over.skipped)
    for field in ("momentum", "prev", "prev_sq_norms", "norm_ema", "history"):
        assert leaves_equal(getattr(over, field), getattr(plain, field)), field
    assert all(torch.equal(v, torch.zeros_like(v)) for v in g.values())


def test_reduce_sees_the_accumulated_cycle_before_the_resolution():
    params = make_params()
    seen = []

    def halve_second(cycle):  # a stand-in for the cross-rank mean
        seen.append(cycle)
        acc, losses, raw = cycle
        return (
            {
                k: v * torch.tensor([1.0, 0.5]).reshape(2, 1, *([1] * (v.dim() - 2)))
                for k, v in acc.items()
            },
            losses,
            raw,
        )

    t = conductor(
        conflicting_losses, LAMBDAS, accumulation_steps=2, stochastic=False, reduce=halve_second
    )
    ref = conductor(conflicting_losses, LAMBDAS, accumulation_steps=2, stochastic=False)
    state, g = t.update(t.init(params), params, make_batches(2))
    # what is communicated: the K task-stacked A_k (K·n floats) and the two loss vectors (2K)
    acc, losses, raw = seen[0]
    assert sum(v.numel() for v in acc.values()) == 2 * sum(p.numel() for p in params.values())
    assert losses.shape == raw.shape == (2,)
    want_acc, want_losses, want_raw = accumulate(
        conflicting_losses, params, make_batches(2), stochastic=False
    )
    assert all(torch.equal(acc[k], want_acc[k]) for k in acc)
    # the resolution ran on the reduced A_k
    half = {
        k: v * torch.tensor([1.0, 0.5]).reshape(2, 1, *([1] * (v.dim() - 2)))
        for k, v in want_acc.items()
    }
    s2, g2 = ref.process(ref.init(params), half, want_losses, want_raw, params)
    assert leaves_equal(state._replace(touched=s2.touched), s2)
    assert all(torch.equal(g[k], g2[k]) for k in g)
    with pytest.raises(TypeError, match="reduce"):
        conductor(two_losses, LAMBDAS, accumulation_steps=2, reduce=3)


def test_process_compiles_fullgraph():
    params = make_params()
    t = conductor(
        two_losses, LAMBDAS, accumulation_steps=2, stochastic=False, norm_cap=0.5, use_lion=True
    )
    cycle = t.accumulate(params, make_batches(2))
    acc, losses, raw = cycle.grads, cycle.losses, cycle.raw_losses
    state = t.init(params)

    def f(state, acc, losses, raw, params):
        return t.process(state, acc, losses, raw, params)

    s_e, g_e = f(state, acc, losses, raw, params)
    s_c, g_c = torch.compile(f, fullgraph=True, backend="aot_eager")(
        state, acc, losses, raw, params
    )
    assert all(torch.allclose(g_e[k], g_c[k], atol=1e-7) for k in g_e)
    la, lb = tree.leaves(s_e), tree.leaves(s_c)
    assert all(torch.allclose(x.float(), y.float(), atol=1e-6) for x, y in zip(la, lb, strict=True))
    # the Lion update: sign * trust * coef
    tau = torch.clamp(params["w"].norm() / s_e.momentum.mu["w"].norm() * (1 - 0.85), max=100.0)
    assert torch.allclose(g_e["w"].abs().max(), tau * 1e-4, rtol=1e-4)


def test_microbatches_and_arguments_are_checked():
    with pytest.raises(ValueError, match="divisible"):
        conductor(two_losses, [1.0, 1.0, 1.0], accumulation_steps=4)
    conductor(two_losses, [1.0, 1.0, 1.0], accumulation_steps=4, stochastic=False)  # fine
    with pytest.raises(ValueError, match="conflict_thresholds"):
        conductor(two_losses, LAMBDAS, accumulation_steps=2, thresholds=(0.0, -0.5, -0.8))
    with pytest.raises(ValueError, match="momentum_beta"):
        conductor(two_losses, LAMBDAS, accumulation_steps=2, momentum_beta=1.0)
    with pytest.raises(ValueError, match="dominance_window"):
        conductor(two_losses, LAMBDAS, accumulation_steps=2, dominance_window=-1)
    with pytest.raises(ValueError, match="lambdas"):
        conductor(two_losses, [], accumulation_steps=2)
    with pytest.raises(ValueError, match="accumulation_steps"):
        conductor(two_losses, LAMBDAS, accumulation_steps=0)
    with pytest.raises(ValueError, match="tie_breaking_weights"):
        conductor(two_losses, LAMBDAS, accumulation_steps=2, tie_breaking_weights=(1.0, -0.5))
    with pytest.raises(TypeError, match="loss_fn"):
        conductor(None, LAMBDAS, accumulation_steps=2)
    t = conductor(two_losses, LAMBDAS, accumulation_steps=2)
    with pytest.raises(ValueError, match="microbatches"):
        t.update(t.init(make_params()), make_params(), make_batches(3))
    with pytest.raises(TypeError, match="microbatches"):
        t.update(t.init(make_params()), make_params(), 5)
    assert math.isclose(reference_options()["norm_floor"], 1e-4)


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("use_lion", [False, True])
def test_donated_state_gives_bit_identical_states_and_gradients(stochastic, use_lion):
    kw = dict(accumulation_steps=2, stochastic=stochastic, use_lion=use_lion, norm_cap=1.0)
    plain = conductor(conflicting_losses, LAMBDAS, **kw)
    donated = conductor(conflicting_losses, LAMBDAS, donate_state=True, **kw)
    params = make_params(scale=0.3)
    s_plain, s_donated = plain.init(params), donated.init(params)
    skipped = []
    for cycle in range(6):
        micro = make_batches(2, seed=30 + cycle)
        if cycle in (2, 4):  # non-finite cycles: skipped
            micro[cycle % 2] = (micro[cycle % 2][0], micro[cycle % 2][1] * float("nan"))
        s_plain, g_plain = plain.update(s_plain, params, micro)
        s_donated, g_donated = donated.update(s_donated, params, micro)
        assert tree_equal(g_plain, g_donated), cycle
        assert tree_equal(s_plain, clone_tree(s_donated)), cycle
        skipped.append(bool(s_plain.skipped))
        params = {n: p - 0.1 * g_plain[n] for n, p in params.items()}
    assert skipped == [False, False, True, False, True, False]
    assert int(s_donated.num_skipped) == 2 and int(s_donated.step) == 4


@pytest.mark.parametrize("source", ["raw", "processed"])
def test_donated_state_reuses_two_buffer_sets_bit_identically(source):
    kw = dict(accumulation_steps=2, stochastic=False, stability_source=source)
    plain = conductor(conflicting_losses, LAMBDAS, **kw)
    donated = conductor(conflicting_losses, LAMBDAS, donate_state=True, **kw)
    params = make_params(scale=0.3)
    s_plain = plain.init(params)
    s_donated = donated.init(params)
    storages = []
    for cycle in range(5):
        micro = make_batches(2, seed=50 + cycle)
        s_plain, g_plain = plain.update(s_plain, params, micro)
        s_donated, g_donated = donated.update(s_donated, params, micro)
        assert tree_equal(g_plain, g_donated), cycle
        assert tree_equal(s_plain, clone_tree(s_donated)), cycle
        storages.append(s_donated.prev["w"].untyped_storage().data_ptr())
        params = {n: p - 0.1 * g_plain[n] for n, p in params.items()}
    if source == "raw":  # the previous gradients are the buffers themselves, two sets in turn
        assert storages[0] == storages[2] == storages[4] != storages[1] == storages[3]
    # a state from elsewhere (its previous gradients in no buffer of this conductor) works too
    s_again, g_again = donated.update(plain.init(params), params, make_batches(2, seed=9))
    s_ref, g_ref = plain.update(plain.init(params), params, make_batches(2, seed=9))
    assert tree_equal(g_again, g_ref) and tree_equal(s_ref, clone_tree(s_again))


@pytest.mark.parametrize("options", [{}, {"norm_cap": 0.5, "stability_source": "processed"}])
def test_float32_vector_passes_take_the_gramian_decisions(options):
    # away from the cosine-0 residual of a projection (weak threshold -0.05: at 0 any rounding,
    # float32 too, decides whether the pair is projected again) the float32 vector passes and
    # the Gramian agree; the conductor does not mutate its input accumulators
    params = make_params(scale=0.1)  # outputs near 0: the two losses pull apart
    runs = {}
    for resolution in ("gramian", "vectors"):
        t = conductor(
            conflicting_losses,
            LAMBDAS,
            accumulation_steps=2,
            stochastic=False,
            thresholds=(-0.8, -0.5, -0.05),
            resolution=resolution,
            arbitrate_weak=True,
            **options,
        )
        state, outs, iters = t.init(params), [], []
        for step in range(4):
            cycle = t.accumulate(params, make_batches(2, seed=30 + step))
            before = clone_tree(cycle.grads)
            state, out = t.process(state, cycle.grads, cycle.losses, cycle.raw_losses, params)
            assert tree_equal(cycle.grads, before)
            outs.append(out)
            iters.append((int(state.proj_iters), state.winners.tolist()))
        runs[resolution] = (outs, iters)
    assert runs["gramian"][1] == runs["vectors"][1]
    assert sum(i for i, _ in runs["gramian"][1]) > 0
    for a, b in zip(runs["gramian"][0], runs["vectors"][0], strict=True):
        for x, y in zip(tree.leaves(a), tree.leaves(b), strict=True):
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)
