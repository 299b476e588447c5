"""resolve_vectors: GCond's resolution as the reference's in-place bfloat16 vector passes, against
the plain emulation of tests._utils.gcond_bf16 (bit for bit) and against resolve_gramian."""

from __future__ import annotations

from collections import deque

import pytest
import torch

from gradfn.conflict import resolve_gramian, resolve_vectors, vector_dots
from tests._utils import gcond_bf16

SHAPES = [(7, 5), (11,), (3, 2, 2)]
SEED_CRITICAL = 6


def _problem(seed: int, k: int, dtype=torch.bfloat16):
    """Task-stacked leaves: a conflicting pair (critical, main or weak zone by ``seed % 3``) and
    further rows mildly aligned with the first."""
    gen = torch.Generator().manual_seed(seed)
    against, noise = [(0.9, 0.4), (0.6, 0.7), (0.2, 1.0)][seed % 3]
    leaves = []
    for shape in SHAPES:
        base = torch.randn(shape, generator=gen)
        rows = [base * (1 + 0.5 * torch.rand((), generator=gen))]
        rows.append(-against * base + noise * torch.randn(shape, generator=gen))
        for _ in range(k - 2):
            rows.append(0.3 * base + torch.randn(shape, generator=gen))
        leaves.append(torch.stack(rows).to(dtype))
    return leaves


def _as_lists(leaves):
    return [[x[i].clone() for x in leaves] for i in range(leaves[0].shape[0])]


@pytest.mark.parametrize("smooth", [True, False])
@pytest.mark.parametrize(("k", "seed"), [(2, 0), (2, 1), (2, 2), (3, 3), (3, 4), (3, 5)])
def test_matches_the_in_place_bfloat16_emulation_bit_for_bit(smooth, k, seed):
    leaves = _problem(seed, k)
    prev = _problem(seed + 100, k)
    ema = torch.tensor([1.3, 0.7, 1.1][:k])
    window = 2
    history = torch.tensor([1, 1]) if seed % 2 else torch.full((window,), -1)
    theirs = _as_lists(leaves)
    hist = deque([h for h in history.tolist() if h >= 0], maxlen=window)
    stats = gcond_bf16.resolve_in_place(
        theirs,
        smooth=smooth,
        ema=ema.tolist(),
        prev=_as_lists(prev),
        hist=hist,
        window=window,
    )
    res = resolve_vectors(
        leaves,
        rule="smooth" if smooth else "zones",
        norm_floor=1e-4,
        norm_ema=ema,
        prev=prev,
        prev_sq_norms=torch.diagonal(vector_dots(prev)),
        history=history,
        arbitrate_weak=True,
    )
    assert stats["proj_iters"] > 0
    assert int(res.iterations) == stats["proj_iters"]
    assert [w for w in res.winners.tolist() if w >= 0] == stats["winners"]
    assert [h for h in res.history.tolist() if h >= 0] == list(hist)
    assert float(res.min_cosine_before) == stats["min_cosine_sim"]
    for i, row in enumerate(theirs):
        for x, y in zip(res.grads, row, strict=True):
            assert torch.equal(x[i], y), (i, x[i], y)
    # the Gramian it returns is the one of the rounded vectors, computed the same way
    assert torch.equal(res.gramian, vector_dots(res.grads))


def test_the_float32_gramian_stops_where_the_rounded_vectors_project_again():
    # a critical-zone pair: one projection leaves cosine 0 in exact arithmetic, and the float32
    # Gramian stops there; the rounded vectors keep a small negative cosine, below the weak
    # threshold 0, and the reference projects again (the old path's divergence)
    leaves = _problem(SEED_CRITICAL, 2)
    gram = resolve_gramian(vector_dots(leaves), norm_floor=1e-4, arbitrate_weak=True)
    res = resolve_vectors([x.clone() for x in leaves], norm_floor=1e-4, arbitrate_weak=True)
    stats = gcond_bf16.resolve_in_place(_as_lists(leaves), ema=None, prev=None, window=3)
    assert int(gram.iterations) == 1
    assert float(gram.min_cosine_after) == 0.0
    assert int(res.iterations) == stats["proj_iters"] == 4
    assert -1e-2 < float(res.min_cosine_after) < 0.0


@pytest.mark.parametrize("rule", ["smooth", "zones"])
def test_float64_vectors_take_the_gramian_decisions(rule):
    for seed in range(4):
        leaves = _problem(seed, 3, torch.float64)
        gram = vector_dots(leaves).double()
        exact = resolve_gramian(gram, rule=rule, norm_floor=1e-4, max_iters=2)
        res = resolve_vectors([x.clone() for x in leaves], rule=rule, norm_floor=1e-4, max_iters=2)
        assert torch.equal(res.pairs, exact.pairs)
        assert torch.equal(res.winners, exact.winners)
        assert torch.allclose(res.coefficients.double(), exact.coefficients, atol=1e-5)
        for x, y in zip(res.grads, leaves, strict=True):
            want = torch.einsum("ij,j...->i...", exact.coefficients, y)
            assert torch.allclose(x, want, atol=1e-5)


def test_bad_arguments():
    leaves = _problem(0, 2)
    with pytest.raises(ValueError, match="rule"):
        resolve_vectors(leaves, rule="hard")
    with pytest.raises(ValueError, match="max_iters"):
        resolve_vectors(leaves, max_iters=-1)
    with pytest.raises(ValueError, match="prev"):
        resolve_vectors(leaves, prev=leaves)
    with pytest.raises(ValueError, match="dominance"):
        resolve_vectors(leaves, dominance="never")
