"""``touched_mask``: which leaves a SON-GOKU step touched, so that an optimizer loop leaves the
inactive heads alone (arXiv:2509.16959, Alg. 1 back-propagates the active group only)."""

from __future__ import annotations

import itertools

import pytest
import torch

from gradfn import songoku, value_and_per_task_grads
from gradfn.algorithms import SonGokuState, touched_mask

K = 3
D = 4


def _params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {"trunk": torch.randn(D, generator=g)}
    out.update({f"head.{k}": torch.randn(2, generator=g) for k in range(K)})
    return out


def _loss(p, b):
    x, y = b
    z = x @ p["trunk"]  # (B,)
    return [((z[:, None] * p[f"head.{k}"]).sum(1) - y[:, k]).pow(2).mean() for k in range(K)]


def _batch(i: int):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(8, D, generator=g), torch.randn(8, K, generator=g)


def _two_groups(state: SonGokuState) -> SonGokuState:
    """Groups {0, 1} and {2}, cycling from the first (as a refresh would set them)."""
    groups = torch.zeros(K, K, dtype=torch.bool)
    groups[0, :2] = True
    groups[1, 2] = True
    return state._replace(groups=groups, num_groups=torch.tensor(2))


def _train(use_mask: bool, steps: int = 6):
    tx = songoku(_loss, num_tasks=K, shared=["trunk"], refresh_period=1000)
    params = {n: p.clone() for n, p in _params().items()}
    opt = torch.optim.Adam(list(params.values()), lr=0.1)
    usage = value_and_per_task_grads(_loss, params, _batch(0), return_usage=True)[2]
    state = _two_groups(tx.init(params))
    history = []
    for t in range(steps):
        state, grads = tx.step(state, params, _batch(t))
        touched = touched_mask(state, usage)
        for n, p in params.items():
            p.grad = grads[n] if (not use_mask or bool(touched[n])) else None
        opt.step()
        history.append((state.active.tolist(), {n: p.detach().clone() for n, p in params.items()}))
    return history


def test_adam_loop_leaves_inactive_heads_bit_identical():
    hist = _train(use_mask=True)
    for (_, before), (active_next, after) in itertools.pairwise(hist):
        for k in range(K):
            same = torch.equal(before[f"head.{k}"], after[f"head.{k}"])
            assert same == (not active_next[k]), (k, active_next)
        assert not torch.equal(before["trunk"], after["trunk"])
    # head 2 ran at steps 1, 3, 5 only: it has Adam momentum when inactive at steps 2 and 4
    assert [a[2] for a, _ in hist] == [False, True, False, True, False, True]


def test_writing_the_zero_gradients_moves_inactive_heads():
    """The sensitivity of the test above: zeros in ``.grad`` move a head with momentum."""
    hist = _train(use_mask=False)
    assert not torch.equal(hist[1][1]["head.2"], hist[2][1]["head.2"])


def test_mask_matches_a_naive_oracle_and_a_skip_touches_nothing():
    tx = songoku(_loss, num_tasks=K, shared=["trunk"], refresh_period=1000)
    params = _params()
    usage = value_and_per_task_grads(_loss, params, _batch(0), return_usage=True)[2]
    reach = {"trunk": {0, 1, 2}, **{f"head.{k}": {k} for k in range(K)}}
    state = _two_groups(tx.init(params))
    for t in range(3):
        state, grads = tx.step(state, params, _batch(t))
        mask = touched_mask(state, usage)
        active = {k for k in range(K) if bool(state.active[k])}
        for n in params:
            assert mask[n].shape == () and mask[n].dtype == torch.bool
            assert bool(mask[n]) == bool(reach[n] & active)
            if not bool(mask[n]):
                assert torch.count_nonzero(grads[n]) == 0
    skipped = state._replace(skipped=torch.tensor(True))
    assert not any(bool(v) for v in touched_mask(skipped, usage).values())


def test_bad_usage_raises_value_error():
    tx = songoku(_loss, num_tasks=K, shared=["trunk"], refresh_period=1000)
    state = tx.init(_params())
    with pytest.raises(ValueError, match="usage"):
        touched_mask(state, {"trunk": torch.ones(K + 1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="usage"):
        touched_mask(state, {"trunk": torch.ones(K)})
    with pytest.raises(ValueError, match="usage"):
        touched_mask(state, {})


def test_compiles_fullgraph():
    tx = songoku(_loss, num_tasks=K, shared=["trunk"], refresh_period=1000)
    params = _params()
    usage = value_and_per_task_grads(_loss, params, _batch(0), return_usage=True)[2]
    state = _two_groups(tx.init(params))
    state, _ = tx.step(state, params, _batch(0))
    compiled = torch.compile(touched_mask, fullgraph=True, backend="aot_eager")
    got, want = compiled(state, usage), touched_mask(state, usage)
    assert {n: bool(v) for n, v in got.items()} == {n: bool(v) for n, v in want.items()}
