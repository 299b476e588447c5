"""gradfn.conductor: accumulation modes, the pure resolve + momentum part, skip-on-non-finite."""

from __future__ import annotations

import math

import optree
import pytest
import torch
from gradfn.conductor import (
    accumulate,
    conductor,
    discard_cycle,
    make_config,
    process,
    reference_options,
)

from gradfn import tree
from gradfn.conflict import init_history, resolve

LAMBDAS = [1.0, 0.5]


def _params(seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 4, generator=gen) * scale,
        "b": torch.randn(3, generator=gen) * scale,
    }


def _batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 4, generator=gen), torch.randn(5, 3, generator=gen)) for _ in range(n)]


def _losses(p, batch):
    x, y = batch
    out = x @ p["w"].T + p["b"]
    return [((out - y) ** 2).mean(), ((out[:, 0] + 2 * y[:, 1]) ** 2).mean()]


def _grad_of(task, p, batch):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
    loss = _losses(leaves, batch)[task]
    gs = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, gs, strict=True)), float(loss.detach())


class Counting:
    """A loss function that counts its forward calls and the batches it saw."""

    def __init__(self):
        self.calls = 0
        self.seen = []

    def __call__(self, p, batch):
        self.calls += 1
        self.seen.append(id(batch))
        return _losses(p, batch)


def _equal_states(a, b):
    la, lb = optree.tree_leaves(a), optree.tree_leaves(b)
    return len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb, strict=True))


# ---------------------------------------------------------------------------------------------
# accumulation


@pytest.mark.parametrize("stochastic", [False, True])
def test_pass_counts_classic_vs_stochastic(stochastic):
    n, k = 4, 2
    fn = Counting()
    batches = _batches(n)
    fetched = []

    def provider():
        fetched.append(len(fetched))
        return batches[len(fetched) - 1]

    cfg = make_config(LAMBDAS, n, stochastic=stochastic)
    accumulate(cfg, fn, _params(), provider)
    assert len(fetched) == n  # the provider is called N times in both modes
    assert fn.calls == n  # ONE forward per micro-batch (the reference's classic mode: N·K)
    assert k * n > fn.calls


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_classic_accumulation_is_lambda_weighted_mean(strategy):
    n = 3
    params, batches = _params(), _batches(n)
    cfg = make_config(LAMBDAS, n, stochastic=False, strategy=strategy)
    acc, losses, raw = accumulate(cfg, _losses, params, batches)
    for task, lam in enumerate(LAMBDAS):
        want = {k: torch.zeros_like(v) for k, v in params.items()}
        loss_sum = 0.0
        for b in batches:
            g, loss = _grad_of(task, params, b)
            want = {k: want[k] + lam * g[k] / n for k in want}
            loss_sum += loss / n
        for name in params:
            assert torch.allclose(acc[name][task], want[name], atol=1e-6)
        assert float(raw[task]) == pytest.approx(loss_sum, rel=1e-5)
        assert float(losses[task]) == pytest.approx(lam * loss_sum, rel=1e-5)


def test_stochastic_accumulation_uses_disjoint_blocks():
    n = 4  # K = 2 -> S = 2 micro-batches per loss, in blocks: loss 0 gets 0, 1; loss 1 gets 2, 3
    params, batches = _params(), _batches(n)
    cfg = make_config(LAMBDAS, n, stochastic=True)
    acc, losses, _ = accumulate(cfg, _losses, params, batches)
    for task, lam in enumerate(LAMBDAS):
        block = batches[2 * task : 2 * task + 2]
        want = {k: torch.zeros_like(v) for k, v in params.items()}
        loss_sum = 0.0
        for b in block:
            g, loss = _grad_of(task, params, b)
            want = {k: want[k] + lam * g[k] / 2 for k in want}
            loss_sum += lam * loss / 2
        for name in params:
            assert torch.allclose(acc[name][task], want[name], atol=1e-6)
        assert float(losses[task]) == pytest.approx(loss_sum, rel=1e-5)


def test_bfloat16_accumulation_option():
    cfg = make_config(LAMBDAS, 2, stochastic=False, accumulation_dtype=torch.bfloat16)
    acc, _, _ = accumulate(cfg, _losses, _params(), _batches(2))
    ref, _, _ = accumulate(
        make_config(LAMBDAS, 2, stochastic=False), _losses, _params(), _batches(2)
    )
    assert acc["w"].dtype == torch.bfloat16
    assert torch.allclose(acc["w"].float(), ref["w"], rtol=2e-2, atol=1e-2)
    t = conductor(_losses, LAMBDAS, accumulation_steps=2, **reference_options())
    s = t.init(_params())
    s, g = t.update(s, _params(), _batches(2))
    assert g["w"].dtype == torch.bfloat16 and s.momentum.mu["w"].dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# the transform end to end


def test_one_loss_equals_plain_accumulation_plus_momentum():
    beta, n = 0.7, 3
    t = conductor(lambda p, b: [_losses(p, b)[0]], [2.0], accumulation_steps=n, momentum_beta=beta)
    params = _params()
    state = t.init(params)
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    for step in range(1, 4):
        batches = _batches(n, seed=10 + step)
        state, out = t.update(state, params, batches)
        g = {k: torch.zeros_like(v) for k, v in params.items()}
        for b in batches:
            gb, _ = _grad_of(0, params, b)
            g = {k: g[k] + 2.0 * gb[k] / n for k in g}
        m = {k: beta * m[k] + (1 - beta) * g[k] for k in m}
        for k in params:
            assert torch.allclose(out[k], m[k] / (1 - beta**step), atol=1e-6)
        assert int(state.step) == step and int(state.proj_iters) == 0
        assert float(state.min_cosine_sim) == 1.0
        params = {k: v - 0.1 * out[k] for k, v in params.items()}


def _conflict(p, batch):
    x, y = batch
    out = x @ p["w"].T + p["b"]
    return [((out - y) ** 2).mean(), ((out + y) ** 2).mean() * 0.5]


def test_return_raw_grad_is_the_resolved_sum_and_momentum_still_advances():
    params, batches = _params(scale=0.1), _batches(2)
    raw = conductor(
        _conflict, LAMBDAS, accumulation_steps=2, stochastic=False, return_raw_grad=True
    )
    s, g = raw.update(raw.init(params), params, batches)
    acc, _, _ = accumulate(make_config(LAMBDAS, 2, stochastic=False), _conflict, params, batches)
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
    params = _params(scale=0.1)  # outputs near 0: the two losses pull in opposite directions
    state = t.init(params)
    state, g = t.update(state, params, _batches(2))
    assert float(state.min_cosine_sim) < -0.5  # true minimum, strongly conflicting
    assert int(state.proj_iters) >= 1
    assert float(state.min_cosine_after) > float(state.min_cosine_sim)
    assert int((state.winners >= 0).sum()) >= 1
    assert float(state.final_grad_norm) == pytest.approx(float(tree.tree_norm(g)), rel=1e-6)
    ref = conductor(
        conflict, [1.0, 1.0], accumulation_steps=2, stochastic=False, min_cosine="reference"
    )
    s2, _ = ref.update(ref.init(params), params, _batches(2))
    assert float(s2.min_cosine_sim) == pytest.approx(float(state.min_cosine_sim))
    # a non-conflicting cycle: the reference's stat says 1.0, ours the true minimum
    easy = conductor(lambda p, b: [_losses(p, b)[0]] * 2, [1.0, 1.0], accumulation_steps=2)
    s3, _ = easy.update(easy.init(params), params, _batches(2))
    ref3 = conductor(
        lambda p, b: [_losses(p, b)[0]] * 2,
        [1.0, 1.0],
        accumulation_steps=2,
        min_cosine="reference",
    )
    s4, _ = ref3.update(ref3.init(params), params, _batches(2))
    # (stochastic mode: the two copies of the loss see different micro-batches)
    assert 0.0 < float(s3.min_cosine_sim) < 1.0 and float(s4.min_cosine_sim) == 1.0


def test_stability_source_raw_vs_processed():
    def conflict(p, batch):
        x, y = batch
        out = x @ p["w"].T + p["b"]
        return [((out - y) ** 2).mean(), ((out + y) ** 2).mean()]

    params = _params(scale=0.1)
    states = {}
    for src in ("raw", "processed"):
        t = conductor(
            conflict, [1.0, 1.0], accumulation_steps=2, stochastic=False, stability_source=src
        )
        s, _ = t.update(t.init(params), params, _batches(2))
        states[src] = s
    acc, _, _ = accumulate(
        make_config([1.0, 1.0], 2, stochastic=False), conflict, params, _batches(2)
    )
    assert all(torch.allclose(states["raw"].prev[k], acc[k]) for k in acc)
    assert not torch.allclose(states["processed"].prev["w"], acc["w"])
    assert torch.allclose(states["raw"].prev_sq_norms, torch.diagonal(tree.gramian(acc)), rtol=1e-5)


def test_non_finite_gradient_skips_the_cycle():
    t = conductor(_losses, LAMBDAS, accumulation_steps=2, stochastic=False)
    params = _params()
    state, _ = t.update(t.init(params), params, _batches(2))
    bad = _batches(2)
    bad[1] = (bad[1][0].clone(), bad[1][1].clone())
    bad[1][1][0, 0] = float("nan")
    new, g = t.update(state, params, bad)
    assert bool(new.skipped) and int(new.num_skipped) == 1
    for field in ("momentum", "prev", "prev_sq_norms", "norm_ema", "history"):
        assert _equal_states(getattr(new, field), getattr(state, field)), field
    assert all(torch.equal(v, torch.zeros_like(v)) for v in g.values())
    after, _ = t.update(new, params, _batches(2))
    assert not bool(after.skipped) and int(after.step) == 2 and int(after.num_skipped) == 1
    inf = _batches(2)
    inf[0] = (inf[0][0] * float("inf"), inf[0][1])
    s_inf, _ = t.update(state, params, inf)
    assert bool(s_inf.skipped) and int(s_inf.step) == 1
    # a donated state: the skip is decided on the host, the old algorithm state is kept as is
    free = conductor(_losses, LAMBDAS, accumulation_steps=2, stochastic=False, donate_state=True)
    raw_new, g_free = free.update(state, params, bad)
    assert bool(raw_new.skipped) and int(raw_new.step) == 1
    assert raw_new.inner.inner is state.inner.inner
    assert all(torch.equal(v, torch.zeros_like(v)) for v in g_free.values())
    kept = discard_cycle(state, raw_new)
    for field in ("momentum", "prev", "prev_sq_norms", "norm_ema", "history", "final_grad_norm"):
        assert _equal_states(getattr(kept, field), getattr(new, field)), field


@pytest.mark.parametrize("stochastic", [False, True])
def test_loss_scale_is_exact_and_an_overflow_is_skipped(stochastic):
    # a power-of-two scale: scaling the losses and unscaling the sums is exact, bit for bit
    t = conductor(_conflict, LAMBDAS, accumulation_steps=2, stochastic=stochastic)
    params = _params()
    state = t.init(params)
    plain = scaled = state
    for c in range(3):
        plain, g_plain = t.update(plain, params, _batches(2, seed=c))
        scaled, g_scaled = t.update(
            scaled, params, _batches(2, seed=c), loss_scale=torch.tensor(2.0**12)
        )
        assert _equal_states(scaled, plain)
        assert all(torch.equal(g_scaled[k], g_plain[k]) for k in g_plain)
    # a scale that overflows float32 in the backward: skipped, state unchanged, zeros out
    over, g = t.update(plain, params, _batches(2, seed=9), loss_scale=torch.tensor(2.0**127))
    assert bool(over.skipped)
    for field in ("momentum", "prev", "prev_sq_norms", "norm_ema", "history"):
        assert _equal_states(getattr(over, field), getattr(plain, field)), field
    assert all(torch.equal(v, torch.zeros_like(v)) for v in g.values())


def test_reduce_sees_the_accumulated_cycle_before_the_resolution():
    params = _params()
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

    t = conductor(_conflict, LAMBDAS, accumulation_steps=2, stochastic=False, reduce=halve_second)
    ref = conductor(_conflict, LAMBDAS, accumulation_steps=2, stochastic=False)
    cfg = make_config(LAMBDAS, 2, stochastic=False)
    state, g = t.update(t.init(params), params, _batches(2))
    # what is communicated: the K task-stacked A_k (K·n floats) and the two loss vectors (2K)
    acc, losses, raw = seen[0]
    assert sum(v.numel() for v in acc.values()) == 2 * sum(p.numel() for p in params.values())
    assert losses.shape == raw.shape == (2,)
    want_acc, want_losses, want_raw = accumulate(cfg, _conflict, params, _batches(2))
    assert all(torch.equal(acc[k], want_acc[k]) for k in acc)
    # the resolution ran on the reduced A_k
    half = {
        k: v * torch.tensor([1.0, 0.5]).reshape(2, 1, *([1] * (v.dim() - 2)))
        for k, v in want_acc.items()
    }
    s2, g2 = process(cfg, ref.init(params), half, want_losses, want_raw, params)
    assert _equal_states(state._replace(touched=s2.touched), s2)
    assert all(torch.equal(g[k], g2[k]) for k in g)
    with pytest.raises(TypeError, match="reduce"):
        conductor(_losses, LAMBDAS, accumulation_steps=2, reduce=3)


def test_process_compiles_fullgraph():
    params = _params()
    cfg = make_config(LAMBDAS, 2, stochastic=False, norm_cap=0.5, use_lion=True)
    acc, losses, raw = accumulate(cfg, _losses, params, _batches(2))
    t = conductor(
        _losses, LAMBDAS, accumulation_steps=2, stochastic=False, norm_cap=0.5, use_lion=True
    )
    state = t.init(params)

    def f(state, acc, losses, raw, params):
        return process(cfg, state, acc, losses, raw, params)

    s_e, g_e = f(state, acc, losses, raw, params)
    s_c, g_c = torch.compile(f, fullgraph=True, backend="aot_eager")(
        state, acc, losses, raw, params
    )
    assert all(torch.allclose(g_e[k], g_c[k], atol=1e-7) for k in g_e)
    la, lb = optree.tree_leaves(s_e), optree.tree_leaves(s_c)
    assert all(torch.allclose(x.float(), y.float(), atol=1e-6) for x, y in zip(la, lb, strict=True))
    # the Lion update: sign * trust * coef
    tau = torch.clamp(params["w"].norm() / s_e.momentum.mu["w"].norm() * (1 - 0.85), max=100.0)
    assert torch.allclose(g_e["w"].abs().max(), tau * 1e-4, rtol=1e-4)


def test_microbatches_and_arguments_are_checked():
    with pytest.raises(ValueError, match="divisible"):
        conductor(_losses, [1.0, 1.0, 1.0], accumulation_steps=4)
    conductor(_losses, [1.0, 1.0, 1.0], accumulation_steps=4, stochastic=False)  # fine
    with pytest.raises(ValueError, match="conflict_thresholds"):
        conductor(_losses, LAMBDAS, accumulation_steps=2, thresholds=(0.0, -0.5, -0.8))
    with pytest.raises(ValueError, match="momentum_beta"):
        conductor(_losses, LAMBDAS, accumulation_steps=2, momentum_beta=1.0)
    with pytest.raises(ValueError, match="dominance_window"):
        conductor(_losses, LAMBDAS, accumulation_steps=2, dominance_window=-1)
    with pytest.raises(ValueError, match="lambdas"):
        conductor(_losses, [], accumulation_steps=2)
    with pytest.raises(ValueError, match="accumulation_steps"):
        conductor(_losses, LAMBDAS, accumulation_steps=0)
    with pytest.raises(ValueError, match="tie_breaking_weights"):
        conductor(_losses, LAMBDAS, accumulation_steps=2, tie_breaking_weights=(1.0, -0.5))
    with pytest.raises(TypeError, match="loss_fn"):
        conductor(None, LAMBDAS, accumulation_steps=2)
    t = conductor(_losses, LAMBDAS, accumulation_steps=2)
    with pytest.raises(ValueError, match="microbatches"):
        t.update(t.init(_params()), _params(), _batches(3))
    with pytest.raises(TypeError, match="microbatches"):
        t.update(t.init(_params()), _params(), 5)
    assert math.isclose(reference_options()["norm_floor"], 1e-4)
