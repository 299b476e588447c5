"""GCond's conflict resolution (gradfn.conflict.resolve) against a straightforward vector
implementation of its formulas (arXiv:2509.07252): the smooth and three-zone rules, the arbitrator."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradfn import tree
from gradfn.conflict import (
    check_thresholds,
    gramian_and_cross,
    init_history,
    resolve,
    resolve_gramian,
    true_min_cosine,
)
from gradfn.conflict._resolve import _angle
from tests._utils.oracles import DEFAULT_THRESHOLDS as DEFAULT_T
from tests._utils.oracles import gcond_min_cosine as oracle_min_cos
from tests._utils.oracles import gcond_resolve as oracle


def as_tree(vectors):
    """A two-leaf task-stacked pytree holding the flat vectors (K, n)."""
    stacked = torch.stack(vectors)
    cut = stacked.shape[1] // 2
    return {"a": stacked[:, :cut].reshape(len(vectors), cut, 1), "b": stacked[:, cut:]}


def from_tree(t):
    k = t["a"].shape[0]
    return torch.cat([t["a"].reshape(k, -1), t["b"].reshape(k, -1)], dim=1)


SCALES = [0.0, 1e-6, 1e-3, 1.0, 1e3, 1e6]


@st.composite
def gradient_sets(draw):
    k = draw(st.sampled_from([2, 3, 5, 8]))
    n = draw(st.integers(min_value=3, max_value=10))
    seed = draw(st.integers(min_value=0, max_value=2**31 - 1))
    scales = draw(st.lists(st.sampled_from(SCALES), min_size=k, max_size=k))
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(k, n, generator=gen, dtype=torch.float64)
    return [base[i] * scales[i] for i in range(k)], gen


def check_close(ours, ref, originals, rel):
    """Row by row: |ours - ref| <= rel * (largest original norm involved, at least the row's own)."""
    scale = max(float(x.norm()) for x in originals)
    for a, b in zip(ours, ref, strict=True):
        err = float((a - b).norm())
        assert err <= rel * max(scale, 1e-300), (err, scale)


# ---------------------------------------------------------------------------------------------
# against the oracle


@pytest.mark.parametrize("rule", ["smooth", "zones"])
@given(data=gradient_sets(), reference_floor=st.booleans(), window=st.sampled_from([0, 1, 3]))
def test_matches_vector_oracle_float64(rule, data, reference_floor, window):
    gs, gen = data
    k = len(gs)
    prev = [torch.randn(gs[0].shape[0], generator=gen, dtype=torch.float64) for _ in range(k)]
    ema = (torch.rand(k, generator=gen, dtype=torch.float64) + 0.5).tolist()
    floor = math.sqrt(1e-8) if reference_floor else None
    res = resolve(
        as_tree(gs),
        rule=rule,
        gram_dtype=torch.float64,
        prev=as_tree(prev),
        norm_ema=torch.tensor(ema, dtype=torch.float64),
        norm_floor=floor,
        history=init_history(window),
        arbitrate_weak=True,
    )
    ref, _, _, _ = oracle(
        gs,
        rule=rule,
        floor_sq=1e-8 if reference_floor else 1e-16,
        ema=ema,
        prev=prev,
        window=window,
    )
    check_close(list(from_tree(res.grads)), ref, gs, rel=1e-7)
    assert res.grads["a"].shape == (k, gs[0].shape[0] // 2, 1)
    # the coefficients reproduce the resolved gradients, and weights give their sum
    assert torch.allclose(res.coefficients @ torch.stack(gs), from_tree(res.grads))
    assert torch.allclose(res.weights @ torch.stack(gs), from_tree(res.grads).sum(0))
    fl = 1e-8 if reference_floor else 1e-16
    assert float(res.min_cosine_before) == pytest.approx(oracle_min_cos(gs, floor_sq=fl), abs=1e-9)
    # the cosines after resolution come from C G Cᵀ: a resolved gradient far shorter than the
    # inputs (a near-cancelling projection) loses digits there, ~ eps · (‖g‖max / ‖r‖min)²
    scale = max(float(g.norm()) for g in gs)
    short = min((float(r.norm()) for r in ref if float(r.norm()) ** 2 > fl), default=scale)
    tol = 1e-6 + (1e-13 * (scale / short) ** 2 if short > 0 else 0.0)
    assert float(res.min_cosine_after) == pytest.approx(oracle_min_cos(ref, floor_sq=fl), abs=tol)
    assert 0 <= int(res.iterations) <= 2 * k
    assert res.pairs.shape == (2 * k, 2) and res.winners.shape == (2 * k,)


@pytest.mark.parametrize("rule", ["smooth", "zones"])
@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_matches_oracle_float32_with_history(rule, k):
    gen = torch.Generator().manual_seed(100 + k)
    n = 40
    gs = [torch.randn(n, generator=gen, dtype=torch.float64) * (1 + i) for i in range(k)]
    prev = [torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(k)]
    hist = [0, 0, 0]
    res = resolve(
        as_tree([x.float() for x in gs]),
        rule=rule,
        prev=as_tree([x.float() for x in prev]),
        history=torch.tensor(hist),
        arbitrate_weak=False,
    )
    ref, iters, winners, new_hist = oracle(
        gs, rule=rule, prev=prev, history=hist, window=3, arbitrate_weak=False
    )
    check_close(list(from_tree(res.grads).double()), ref, gs, rel=1e-4)
    assert int(res.iterations) == iters
    got = [w for w in res.winners.tolist() if w >= 0]
    assert got == winners
    assert res.history.tolist()[-len(new_hist) :] == new_hist


@given(data=gradient_sets())
def test_defaults_match_oracle_default_options(data):
    """Defaults: smooth rule, floor on the norm, no history, no previous gradients."""
    gs, _ = data
    res = resolve(as_tree(gs), gram_dtype=torch.float64)
    ref, _, _, _ = oracle(gs, floor_sq=1e-16)
    check_close(list(from_tree(res.grads)), ref, gs, rel=1e-7)


def test_max_iters_zero_and_one():
    gs = [torch.tensor([1.0, 0.0]), torch.tensor([-0.9, 0.3]), torch.tensor([-0.2, -1.0])]
    r0 = resolve(as_tree(gs), max_iters=0)
    assert torch.equal(r0.coefficients, torch.eye(3))
    assert int(r0.iterations) == 0 and r0.pairs.shape == (0, 2)
    r1 = resolve(as_tree([x.double() for x in gs]), max_iters=1, gram_dtype=torch.float64)
    ref, iters, _, _ = oracle([x.double() for x in gs], max_iters=1, floor_sq=1e-16)
    check_close(list(from_tree(r1.grads)), ref, gs, rel=1e-9)
    assert int(r1.iterations) == iters == 1
    assert r1.pairs.tolist() == [[0, 1]]


def test_no_conflict_is_identity_and_reports_true_min():
    gs = [torch.tensor([1.0, 0.2, 0.0]), torch.tensor([0.5, 1.0, 0.1]), torch.tensor([0.3, 0.3, 1])]
    res = resolve(as_tree(gs))
    assert torch.equal(res.coefficients, torch.eye(3))
    assert int(res.iterations) == 0
    assert (res.pairs == -1).all() and (res.winners == -1).all()
    expected = oracle_min_cos([x.double() for x in gs])
    assert float(res.min_cosine_before) == pytest.approx(expected, rel=1e-6)
    assert expected > 0  # a true minimum, not the reference's 1.0


def test_zero_and_single_task():
    gs = [torch.zeros(4), torch.tensor([1.0, 0, 0, 0]), torch.tensor([-1.0, 0.1, 0, 0])]
    res = resolve(as_tree(gs))
    assert torch.equal(from_tree(res.grads)[0], torch.zeros(4))  # zero task untouched, skipped
    assert res.pairs[0].tolist() == [1, 2]
    one = resolve_gramian(torch.tensor([[4.0]]))
    assert torch.equal(one.coefficients, torch.eye(1)) and float(one.min_cosine_before) == 1.0


# ---------------------------------------------------------------------------------------------
# the smooth rule's formulas


@pytest.mark.parametrize(
    ("c", "s_w", "s_l"),
    [
        (-0.1, 0.31, 0.31),
        (-0.25, 0.71, 0.71),
        (-0.4, 0.95, 0.95),
        (-0.5, 1.0, 1.0),
        (-0.6, 0.98, 1.0),
        (-0.7, 0.77, 1.0),
        (-0.75, 0.46, 1.0),
        (-0.8, 0.0, 1.0),
        (-0.95, 0.0, 1.0),
    ],
)
def test_smooth_strengths_match_the_paper_table(c, s_w, s_l):
    alpha = _angle(torch.tensor(c, dtype=torch.float64), DEFAULT_T, 2.0, 1e-8)
    assert math.sin(float(alpha)) == pytest.approx(s_w, abs=0.01)
    assert math.sin(min(float(alpha), math.pi / 2)) == pytest.approx(s_l, abs=0.01)


def _pair_with_cosine(c, n1, n2):
    a = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64) * n1
    b = torch.tensor([c, math.sqrt(1 - c * c), 0.0], dtype=torch.float64) * n2
    return a, b


@pytest.mark.parametrize("c", [-0.05, -0.1, -0.3, -0.45, -0.55, -0.7, -0.79, -0.85, -0.99])
@pytest.mark.parametrize("norms", [(1.0, 1.0), (2.0, 0.5), (30.0, 0.1)])
def test_post_resolution_dot_formula(c, norms):
    """After one smooth iteration: d' = d (1 − s_w − s_l + s_w s_l c²)."""
    a, b = _pair_with_cosine(c, *norms)
    # eps = 0: the formula is exact without the denominators' eps
    res = resolve(as_tree([a, b]), max_iters=1, gram_dtype=torch.float64, eps=0.0)
    ga, gb = from_tree(res.grads)
    alpha = float(_angle(torch.tensor(c, dtype=torch.float64), DEFAULT_T, 2.0, 0.0))
    s_w, s_l = math.sin(alpha), math.sin(min(alpha, math.pi / 2))
    d = float(a @ b)
    expected = d * (1 - s_w - s_l + s_w * s_l * c * c)
    assert float(ga @ gb) == pytest.approx(expected, rel=1e-6, abs=1e-12 * abs(d))
    if c < -0.5:  # main / critical zone: resolved in one iteration (d' >= 0)
        assert float(ga @ gb) >= -1e-9 * abs(d)


def test_three_zone_rule_effects():
    # critical: the loser is zeroed (winner-takes-all)
    a, b = _pair_with_cosine(-0.9, 2.0, 1.0)
    res = resolve(as_tree([a, b]), rule="zones", max_iters=1, gram_dtype=torch.float64)
    ga, gb = from_tree(res.grads)
    w = int(res.winners[0])
    assert torch.equal((ga, gb)[1 - w], torch.zeros(3, dtype=torch.float64))
    assert torch.allclose((ga, gb)[w], (a, b)[w])
    # main: asymmetric projection, the loser becomes orthogonal to the untouched winner
    a, b = _pair_with_cosine(-0.6, 2.0, 1.0)
    res = resolve(as_tree([a, b]), rule="zones", max_iters=1, gram_dtype=torch.float64)
    ga, gb = from_tree(res.grads)
    w = int(res.winners[0])
    assert torch.allclose((ga, gb)[w], (a, b)[w])
    assert abs(float(ga @ gb)) < 1e-8  # eps in the denominator
    # weak: symmetric, nobody arbitrated
    a, b = _pair_with_cosine(-0.3, 2.0, 1.0)
    res = resolve(as_tree([a, b]), rule="zones", max_iters=1, gram_dtype=torch.float64)
    assert int(res.winners[0]) == -1 and int(res.iterations) == 1
    d = float(a @ b)
    ga, gb = from_tree(res.grads)
    assert torch.allclose(ga, a - d / 1.0 * b) and torch.allclose(gb, b - d / 4.0 * a)


def test_true_min_cosine_and_thresholds_validation():
    g = torch.tensor([[1.0, -0.5], [-0.5, 1.0]])
    assert float(true_min_cosine(g)) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="non-decreasing"):
        check_thresholds((-0.5, -0.8, 0.0))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        check_thresholds((-1.5, -0.5, 0.0))
    with pytest.raises(ValueError, match="3 numbers"):
        check_thresholds((-0.5, 0.0))
    with pytest.raises(ValueError, match="rule"):
        resolve_gramian(g, rule="pcgrad")
    with pytest.raises(ValueError, match="max_iters"):
        resolve_gramian(g, max_iters=-1)
    with pytest.raises(ValueError, match="square"):
        resolve_gramian(torch.ones(2, 3))


def test_gramian_input_equals_grads_input():
    gen = torch.Generator().manual_seed(3)
    stacked = {"w": torch.randn(5, 4, 3, generator=gen), "b": torch.randn(5, 3, generator=gen)}
    r1 = resolve(stacked)
    r2 = resolve_gramian(tree.gramian(stacked))
    assert torch.equal(r1.coefficients, r2.coefficients)
    out = tree.combine(r2.coefficients, stacked)
    assert all(torch.equal(out[n], r1.grads[n]) for n in stacked)


def test_compiles_fullgraph():
    gen = torch.Generator().manual_seed(4)
    j = torch.randn(4, 6, generator=gen)
    gram = j @ j.T
    prev = torch.randn(4, 6, generator=gen)

    def f(gram, cross, psq, hist):
        return resolve_gramian(
            gram, prev_cross=cross, prev_sq_norms=psq, history=hist, arbitrate_weak=True
        )

    args = (gram, j @ prev.T, (prev * prev).sum(1), init_history(3))
    eager = f(*args)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    assert torch.allclose(eager.coefficients, compiled.coefficients, atol=1e-6)
    assert torch.equal(eager.winners, compiled.winners)
    assert torch.equal(eager.history, compiled.history)


@pytest.mark.parametrize("chunk", [3, 7, 32768])
def test_gramian_and_cross_match_float64_dot_products(chunk: int) -> None:
    """One pass in column blocks gives the Gramian and the cross-Gramian: checked against every
    pair's float64 dot product over the flattened leaves (blocks smaller than, not dividing, and
    larger than the leaves)."""
    gen = torch.Generator().manual_seed(3)
    a = {"w": torch.randn(3, 5, 4, generator=gen), "b": torch.randn(3, 5, generator=gen)}
    b = {"w": torch.randn(3, 5, 4, generator=gen), "b": torch.randn(3, 5, generator=gen)}
    flat_a = torch.cat([a["w"].reshape(3, -1), a["b"]], 1).double()
    flat_b = torch.cat([b["w"].reshape(3, -1), b["b"]], 1).double()
    g, x = gramian_and_cross(a, b, chunk=chunk)
    assert g.dtype == x.dtype == torch.float32
    for i in range(3):
        for j in range(3):
            assert g[i, j].item() == pytest.approx(float(flat_a[i] @ flat_a[j]), rel=1e-5)
            assert x[i, j].item() == pytest.approx(float(flat_a[i] @ flat_b[j]), rel=1e-5)
