"""Interference ρ = −cos and conflict-graph rules (gradfn.conflict) against written-out oracles."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradfn.conflict import (
    GraphRule,
    conflict_adjacency,
    edge_density,
    interference,
    knn_k_for_density,
)

# The SON-GOKU reference implementation's test matrix of cosines.
COS = torch.tensor(
    [[1.0, -0.8, 0.3, -0.1], [-0.8, 1.0, -0.2, 0.05], [0.3, -0.2, 1.0, 0.7], [-0.1, 0.05, 0.7, 1.0]]
)
RHO = -COS * (1 - torch.eye(4))


def naive_rho(vectors, eps):
    k = len(vectors)
    out = [[0.0] * k for _ in range(k)]
    norms = [math.sqrt(sum(x * x for x in v)) for v in vectors]
    for i in range(k):
        for j in range(k):
            if i == j or norms[i] == 0 or norms[j] == 0:
                continue
            dot = sum(a * b for a, b in zip(vectors[i], vectors[j], strict=True))
            out[i][j] = max(-1.0, min(1.0, -dot / ((norms[i] + eps) * (norms[j] + eps))))
    return torch.tensor(out, dtype=torch.float64)


@given(
    st.integers(1, 6).flatmap(
        lambda k: st.lists(
            st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=4, max_size=4),
            min_size=k,
            max_size=k,
        )
    )
)
def test_interference_matches_naive_cosine(vectors):
    e = torch.tensor(vectors, dtype=torch.float64)
    rho = interference(e @ e.T, eps=1e-12)
    torch.testing.assert_close(rho, naive_rho(vectors, 1e-12), atol=1e-9, rtol=1e-9)
    assert torch.equal(rho, rho.T)
    assert bool((rho.abs() <= 1).all())


def test_interference_zero_and_nonfinite_tasks_have_no_interference():
    e = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0], [float("nan"), 1.0]])
    gram = e @ e.T
    rho = interference(gram)
    assert rho[0, 2] == pytest.approx(1.0)
    assert torch.equal(rho[1], torch.zeros(4)) and torch.equal(rho[:, 1], torch.zeros(4))
    assert torch.equal(rho[3], torch.zeros(4)) and torch.equal(rho[:, 3], torch.zeros(4))
    assert torch.equal(torch.diagonal(rho), torch.zeros(4))


def test_interference_clamps_rounding_overshoot():
    gram = torch.tensor([[1.0, -1.0000001], [-1.0000001, 1.0]])
    assert float(interference(gram, eps=0.0).max()) <= 1.0


def test_threshold_rule_is_the_paper_rule_on_the_reference_example():
    adj, tau = conflict_adjacency(RHO, 0.25, "threshold")
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, 1] = expected[1, 0] = True  # only cos(0,1) = −0.8 < −0.25
    assert torch.equal(adj, expected)
    assert float(tau) == 0.25
    # strict inequality: ρ exactly equal to τ is no edge
    adj2, _ = conflict_adjacency(RHO, 0.8, "threshold")
    assert not bool(adj2.any())
    # τ = 1 (warm-up) ⇒ no edge at all; τ = -1 ⇒ every pair with ρ > -1
    assert not bool(conflict_adjacency(RHO, 1.0)[0].any())


def test_signed_rule():
    adj, _ = conflict_adjacency(RHO, 0.9, "signed")
    expected = {(0, 1), (0, 3), (1, 2)}
    got = {(i, j) for i in range(4) for j in range(i + 1, 4) if adj[i, j]}
    assert got == expected


def upper_pairs(k):
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def naive_quantile_edges(rho, p):
    k = rho.shape[0]
    cos = [(-float(rho[i, j]), (i, j)) for i, j in upper_pairs(k)]
    values = sorted(c for c, _ in cos)
    pos = p * (len(values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    q = values[lo] + (values[hi] - values[lo]) * (pos - lo)
    return {pair for c, pair in cos if c < q}


@given(st.integers(2, 7), st.floats(0, 1), st.integers(0, 10_000))
def test_quantile_rule_matches_naive_quantile(k, p, seed):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(k, 5, generator=g, dtype=torch.float64)
    rho = interference(e @ e.T)
    adj, _ = conflict_adjacency(rho, 0.0, "quantile", quantile=p)
    got = {(i, j) for i, j in upper_pairs(k) if adj[i, j]}
    assert got == naive_quantile_edges(rho, p)


@given(st.integers(2, 7), st.integers(0, 6), st.integers(0, 10_000))
def test_knn_rule_matches_naive_knn(k, nn, seed):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(k, 3, generator=g, dtype=torch.float64)
    rho = interference(e @ e.T)
    adj, _ = conflict_adjacency(rho, 0.0, "knn", knn_k=nn)
    marks = set()
    for i in range(k):
        others = sorted((j for j in range(k) if j != i), key=lambda j: (-float(rho[i, j]), j))
        for j in others[: min(nn, k - 1)]:
            marks.add((min(i, j), max(i, j)))
    got = {(i, j) for i, j in upper_pairs(k) if adj[i, j]}
    assert got == marks
    assert torch.equal(adj, adj.T)


def test_density_matching():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(9, 4, generator=g, dtype=torch.float64)
    rho = interference(e @ e.T)
    a_thr, tau = conflict_adjacency(rho, 0.25, "threshold", density=0.25)
    a_q, _ = conflict_adjacency(rho, 0.25, "quantile", density=0.25, quantile=0.9)
    assert torch.equal(a_thr, a_q)
    assert got_density(a_thr) == pytest.approx(9 / 36)  # 25% of 36 pairs, no ties
    # the returned τ is the effective ρ-threshold: the edges are exactly ρ > τ
    assert torch.equal(a_thr, (rho > tau) & ~torch.eye(9, dtype=torch.bool))
    a_knn, _ = conflict_adjacency(rho, 0.25, "knn", density=0.25, knn_k=7)
    a_k1, _ = conflict_adjacency(rho, 0.25, "knn", knn_k=knn_k_for_density(0.25, 9))
    assert torch.equal(a_knn, a_k1) and knn_k_for_density(0.25, 9) == 1
    a_s, _ = conflict_adjacency(rho, 0.25, "signed", density=0.25)
    assert torch.equal(a_s, conflict_adjacency(rho, 0.0, "signed")[0])


def got_density(adj):
    return float(edge_density(adj))


def test_single_task_has_no_edges():
    rho = torch.zeros(1, 1)
    for rule in ("threshold", "quantile", "knn", "signed"):
        adj, _ = conflict_adjacency(rho, 0.1, rule, density=0.5 if rule != "knn" else None)
        assert adj.shape == (1, 1) and not bool(adj.any())


def test_bad_inputs():
    with pytest.raises(ValueError, match="rule"):
        conflict_adjacency(RHO, 0.25, "cosine")
    with pytest.raises(ValueError, match="density"):
        conflict_adjacency(RHO, 0.25, density=1.5)
    with pytest.raises(ValueError, match="quantile"):
        conflict_adjacency(RHO, 0.25, "quantile", quantile=-0.1)
    with pytest.raises(ValueError, match="rho"):
        conflict_adjacency(torch.zeros(2, 3), 0.25)
    with pytest.raises(ValueError, match="gram"):
        interference(torch.zeros(3))
    with pytest.raises(TypeError, match="gram"):
        interference([[1.0]])


def test_compiles_fullgraph():
    def f(gram):
        rho = interference(gram)
        return conflict_adjacency(rho, 0.25)[0]

    e = torch.randn(5, 3)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(e @ e.T), f(e @ e.T))


# ---------------------------------------------------------------------------------------------
# GraphRule: the arguments of conflict_adjacency as one validated value


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"rule": "cosine"}, "rule"),
        ({"rule": None}, "rule"),
        ({"quantile": 1.5}, "quantile"),
        ({"quantile": -0.1}, "quantile"),
        ({"quantile": float("nan")}, "quantile"),
        ({"quantile": True}, "quantile"),
        ({"knn_k": -1}, "knn_k"),
        ({"knn_k": 2.5}, "knn_k"),
        ({"knn_k": True}, "knn_k"),
        ({"density": 1.01}, "density"),
        ({"density": -0.5}, "density"),
        ({"density": "0.3"}, "density"),
    ],
)
def test_graph_rule_validates_its_fields(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GraphRule(**kwargs)


def test_graph_rule_defaults_and_frozen():
    rule = GraphRule()
    assert (rule.rule, rule.quantile, rule.knn_k, rule.density) == ("threshold", 0.3, 3, None)
    with pytest.raises(AttributeError):
        rule.quantile = 0.5  # type: ignore[misc]
    assert GraphRule(quantile=1, density=0).quantile == 1.0  # ints accepted, stored as floats


@pytest.mark.parametrize("rule", ["threshold", "quantile", "knn", "signed"])
@pytest.mark.parametrize("density", [None, 0.0, 0.4, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_graph_rule_adjacency_equals_conflict_adjacency(rule, density, seed):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(7, 4, generator=g, dtype=torch.float64)
    rho = interference(e @ e.T)
    for tau in (0.25, -0.3, torch.tensor(0.1, dtype=torch.float64)):
        for quantile, knn_k in ((0.3, 3), (0.75, 1), (0.0, 0)):
            graph = GraphRule(rule, quantile=quantile, knn_k=knn_k, density=density)
            adj, used = graph.adjacency(rho, tau)
            want_adj, want_used = conflict_adjacency(
                rho, tau, rule, quantile=quantile, knn_k=knn_k, density=density
            )
            assert torch.equal(adj, want_adj)
            assert torch.equal(used, want_used) or (bool(used.isnan()) and bool(want_used.isnan()))
