"""GCond's arbitrator (gradfn.conflict): dominance rotation, hybrid score, history ring."""

from __future__ import annotations

from collections import deque

import pytest
import torch

from gradfn.conflict import (
    arbitrate,
    init_history,
    is_dominant,
    push_history,
    resolve_gramian,
    stability,
)
from gradfn.transforms import ema_of_norms as update_norm_ema

TI, TJ = torch.tensor(0), torch.tensor(1)


def _arb(history, norms=(1.0, 2.0), ema=(1.0, 1.0), stab=(0.0, 0.0), **kw):
    w, lo = arbitrate(
        TI, TJ, torch.tensor(norms), torch.tensor(ema), torch.tensor(stab), history, **kw
    )
    return int(w), int(lo)


def test_history_ring_is_a_bounded_deque():
    ref = deque(maxlen=3)
    h = init_history(3)
    assert h.tolist() == [-1, -1, -1]
    for w, rec in [(1, True), (0, False), (0, True), (2, True), (1, True), (1, False)]:
        h = push_history(h, torch.tensor(w), torch.tensor(rec))
        if rec:
            ref.append(w)
        assert [x for x in h.tolist() if x >= 0] == list(ref)
    assert push_history(init_history(0), torch.tensor(1), torch.tensor(True)).shape == (0,)


def test_is_dominant_needs_a_full_window():
    assert not bool(is_dominant(torch.tensor([-1, 0, 0]), TI))
    assert bool(is_dominant(torch.tensor([0, 0, 0]), TI))
    assert not bool(is_dominant(torch.tensor([0, 1, 0]), TI))
    assert not bool(is_dominant(init_history(0), TI))


def test_score_decides_without_dominance():
    # strength: j has the larger norm relative to its EMA
    assert _arb(init_history(3)) == (1, 0)
    # an EMA can flip it: j's norm is large but so is its EMA
    assert _arb(init_history(3), ema=(0.5, 10.0)) == (0, 1)
    # stability outweighs strength with the default weights (0.8, 0.2)
    assert _arb(init_history(3), stab=(0.9, 0.0)) == (0, 1)
    # negative stability is clamped at 0 (does not count against a task)
    assert _arb(init_history(3), stab=(0.0, -0.9)) == (1, 0)
    # exact tie -> i
    assert _arb(init_history(3), norms=(1.0, 1.0)) == (0, 1)
    # weights: strength only vs stability only
    assert _arb(init_history(3), stab=(0.9, 0.0), tie_breaking_weights=(0.0, 1.0)) == (1, 0)


def test_dominant_task_loses_or_wins():
    full_of_j = torch.tensor([1, 1, 1])
    # j would win on score, but it is dominant -> forced to lose (the reference's rotation)
    assert _arb(full_of_j) == (0, 1)
    assert _arb(full_of_j, dominance="wins") == (1, 0)
    full_of_i = torch.tensor([0, 0, 0])
    # i is dominant: "loses" -> j; "wins" -> i although j has the better score
    assert _arb(full_of_i) == (1, 0)
    assert _arb(full_of_i, dominance="wins") == (0, 1)
    # a history full of a third task: score decides
    assert _arb(torch.tensor([2, 2, 2])) == (1, 0)
    with pytest.raises(ValueError, match="dominance"):
        _arb(full_of_i, dominance="never")


def test_rotation_across_steps_through_resolve():
    """Task 1 wins the critical pair on strength every step; after W = 3 wins it must lose once."""
    gram = torch.tensor([[1.0, -1.8], [-1.8, 4.0]])  # cosine -0.9 (critical), ||g_1|| = 2 > 1
    hist = init_history(3)
    winners = []
    for _ in range(8):
        res = resolve_gramian(gram, max_iters=1, history=hist)
        hist = res.history
        winners.append(int(res.winners[0]))
    assert winners == [1, 1, 1, 0, 1, 1, 1, 0]
    hist = init_history(3)
    wins = []
    for _ in range(5):
        res = resolve_gramian(gram, max_iters=1, history=hist, dominance="wins")
        hist = res.history
        wins.append(int(res.winners[0]))
    assert wins == [1] * 5
    # window 0 disables the rotation
    res = resolve_gramian(gram, max_iters=1, history=init_history(0))
    assert int(res.winners[0]) == 1 and res.history.shape == (0,)


def test_stability_in_coefficient_space():
    gen = torch.Generator().manual_seed(0)
    g0 = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    prev = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    coeff = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    cur = coeff @ g0
    got = stability(coeff, g0 @ prev.T, (cur * cur).sum(1), (prev * prev).sum(1), 1e-8)
    want = torch.stack(
        [cur[k] @ prev[k] / (cur[k].norm() * prev[k].norm() + 1e-8) for k in range(3)]
    )
    assert torch.allclose(got, want)
    assert torch.equal(stability(coeff, None, (cur * cur).sum(1), None, 1e-8), torch.zeros(3))


def test_norm_ema():
    ema = update_norm_ema(torch.tensor([1.0, 1.0]), torch.tensor([3.0, 0.0]), 0.95, 1e-8)
    assert torch.allclose(ema, torch.tensor([0.95 + 0.05 * 3.0, 0.95]))
    floor = update_norm_ema(torch.tensor([0.0]), torch.tensor([0.0]), 0.9, 1e-3)
    assert float(floor) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="window"):
        init_history(-1)
