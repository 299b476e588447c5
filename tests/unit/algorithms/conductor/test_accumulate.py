"""GradientConductor's accumulation cycle: pass counts, the classic and stochastic modes against
one autograd call per loss and micro-batch, bfloat16 accumulation."""

from __future__ import annotations

import pytest
import torch

from gradfn.algorithms import conductor, reference_options
from tests.unit.algorithms.conductor._problem import (
    LAMBDAS,
    Counting,
    accumulate,
    grad_of,
    make_batches,
    make_params,
    two_losses,
)


@pytest.mark.parametrize("stochastic", [False, True])
def test_pass_counts_classic_vs_stochastic(stochastic):
    n, k = 4, 2
    fn = Counting()
    batches = make_batches(n)
    fetched = []

    def provider():
        fetched.append(len(fetched))
        return batches[len(fetched) - 1]

    accumulate(fn, make_params(), provider, n=n, stochastic=stochastic)
    assert len(fetched) == n  # the provider is called N times in both modes
    assert fn.calls == n  # ONE forward per micro-batch (the reference's classic mode: N·K)
    assert k * n > fn.calls


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_classic_accumulation_is_lambda_weighted_mean(strategy):
    n = 3
    params, batches = make_params(), make_batches(n)
    acc, losses, raw = accumulate(two_losses, params, batches, stochastic=False, strategy=strategy)
    for task, lam in enumerate(LAMBDAS):
        want = {k: torch.zeros_like(v) for k, v in params.items()}
        loss_sum = 0.0
        for b in batches:
            g, loss = grad_of(task, params, b)
            want = {k: want[k] + lam * g[k] / n for k in want}
            loss_sum += loss / n
        for name in params:
            assert torch.allclose(acc[name][task], want[name], atol=1e-6)
        assert float(raw[task]) == pytest.approx(loss_sum, rel=1e-5)
        assert float(losses[task]) == pytest.approx(lam * loss_sum, rel=1e-5)


def test_stochastic_accumulation_uses_disjoint_blocks():
    n = 4  # K = 2 -> S = 2 micro-batches per loss, in blocks: loss 0 gets 0, 1; loss 1 gets 2, 3
    params, batches = make_params(), make_batches(n)
    acc, losses, _ = accumulate(two_losses, params, batches, stochastic=True)
    for task, lam in enumerate(LAMBDAS):
        block = batches[2 * task : 2 * task + 2]
        want = {k: torch.zeros_like(v) for k, v in params.items()}
        loss_sum = 0.0
        for b in block:
            g, loss = grad_of(task, params, b)
            want = {k: want[k] + lam * g[k] / 2 for k in want}
            loss_sum += lam * loss / 2
        for name in params:
            assert torch.allclose(acc[name][task], want[name], atol=1e-6)
        assert float(losses[task]) == pytest.approx(loss_sum, rel=1e-5)


def test_bfloat16_accumulation_option():
    acc, _, _ = accumulate(
        two_losses,
        make_params(),
        make_batches(2),
        stochastic=False,
        accumulation_dtype=torch.bfloat16,
    )
    ref, _, _ = accumulate(two_losses, make_params(), make_batches(2), stochastic=False)
    assert acc["w"].dtype == torch.bfloat16
    assert torch.allclose(acc["w"].float(), ref["w"], rtol=2e-2, atol=1e-2)
    t = conductor(two_losses, LAMBDAS, accumulation_steps=2, **reference_options())
    s = t.init(make_params())
    s, g = t.update(s, make_params(), make_batches(2))
    assert g["w"].dtype == torch.bfloat16 and s.momentum.mu["w"].dtype == torch.bfloat16


@pytest.mark.parametrize("s", [1, 2, 3])
def test_stochastic_block_differentiates_its_own_loss_alone(s):
    # loss 1's target is NaN on loss 0's block: loss 0's A_0 is its own gradient, not poisoned
    def split_targets(p, batch):
        x, y0, y1 = batch
        out = x @ p["w"].T + p["b"]
        return [((out - y0) ** 2).mean(), ((out[:, 0] - y1) ** 2).mean()]

    n = 2 * s
    params = make_params()
    gen = torch.Generator().manual_seed(3)
    batches = [
        (
            torch.randn(5, 4, generator=gen),
            torch.randn(5, 3, generator=gen),
            torch.randn(5, generator=gen),
        )
        for _ in range(n)
    ]
    batches[0] = (batches[0][0], batches[0][1], torch.full((5,), float("nan")))
    acc, losses, raw = accumulate(split_targets, params, batches, stochastic=True)
    for task, lam in enumerate(LAMBDAS):
        want = {k: torch.zeros_like(v) for k, v in params.items()}
        loss_sum = 0.0
        for b in batches[task * s : (task + 1) * s]:
            leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
            loss = split_targets(leaves, b)[task]
            gs = torch.autograd.grad(loss, list(leaves.values()))
            want = {k: want[k] + lam * g / s for k, g in zip(leaves, gs, strict=True)}
            loss_sum += float(loss.detach()) / s
        for name in params:
            assert torch.allclose(acc[name][task], want[name], atol=1e-6), (task, name)
        assert float(raw[task]) == pytest.approx(loss_sum, rel=1e-5)
    assert torch.isfinite(losses).all()
