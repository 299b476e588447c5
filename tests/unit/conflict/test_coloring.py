"""Welsh–Powell colouring, colour groups and min-coverage duplication (gradfn.conflict)."""

import networkx as nx
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradfn.conflict import color, duplicate_min_coverage, groups_from_colors
from tests._utils.oracles import welsh_powell_classes


def random_graph(k, p, seed):
    g = torch.Generator().manual_seed(seed)
    upper = torch.triu(torch.rand(k, k, generator=g) < p, diagonal=1)
    return upper | upper.T


graphs = st.tuples(st.integers(1, 12), st.floats(0, 1), st.integers(0, 2**31 - 1))


@given(graphs)
def test_color_matches_networkx_largest_first(args):
    k, p, seed = args
    adj = random_graph(k, p, seed)
    graph = nx.Graph()
    graph.add_nodes_from(range(k))  # index order ⇒ networkx's stable sort breaks ties by index
    graph.add_edges_from((i, j) for i in range(k) for j in range(i + 1, k) if adj[i, j])
    expected = nx.greedy_color(graph, strategy="largest_first")
    colors = color(adj)
    assert colors.dtype == torch.int64
    assert colors.tolist() == [expected[v] for v in range(k)]


@given(graphs)
def test_color_is_proper_and_matches_the_reference_classes(args):
    k, p, seed = args
    adj = random_graph(k, p, seed)
    colors = color(adj)
    for i in range(k):
        for j in range(k):
            if i != j and adj[i, j]:
                assert colors[i] != colors[j]
    max_degree = int(adj.sum(1).max())
    assert int(colors.max()) + 1 <= max_degree + 1
    groups, m = groups_from_colors(colors)
    classes = [torch.nonzero(groups[c]).flatten().tolist() for c in range(int(m))]
    assert classes == welsh_powell_classes(adj.tolist())
    assert not bool(groups[int(m) :].any())
    assert torch.equal(groups[: int(m)].sum(0), torch.ones(k, dtype=torch.int64))


def test_reference_worked_example():
    cos = torch.tensor(
        [[1, -0.8, 0.3, -0.1], [-0.8, 1, -0.2, 0.05], [0.3, -0.2, 1, 0.7], [-0.1, 0.05, 0.7, 1]]
    )
    # paper rule, τ = 0.25: edge iff cos < −0.25 ⇒ only (0, 1)
    adj = (cos < -0.25) & ~torch.eye(4, dtype=torch.bool)
    groups, m = groups_from_colors(color(adj))
    assert int(m) == 2
    assert groups[0].tolist() == [True, False, True, True]
    assert groups[1].tolist() == [False, True, False, False]
    dup = duplicate_min_coverage(groups, adj, 2)
    as_lists = [torch.nonzero(dup[c]).flatten().tolist() for c in range(int(m))]
    assert as_lists == [[0, 2, 3], [1, 2, 3]]
    assert not bool(dup[2:].any())
    # instrumented rule (cos < 0.25): groups [[1], [0, 2], [3]]
    adj_i = (cos < 0.25) & ~torch.eye(4, dtype=torch.bool)
    groups_i, m_i = groups_from_colors(color(adj_i))
    assert [torch.nonzero(groups_i[c]).flatten().tolist() for c in range(int(m_i))] == [
        [1],
        [0, 2],
        [3],
    ]


def naive_duplicate(classes, adj, f_min):
    classes = [list(c) for c in classes]
    count: dict[int, int] = {}
    order: list[int] = []
    for cls in classes:
        for v in cls:
            count[v] = count.get(v, 0) + 1
            if v not in order:
                order.append(v)
    for v in order:
        need = f_min - count[v]
        for cls in classes:
            if need <= 0:
                break
            if v in cls:
                continue
            if not any(bool(adj[v, u]) for u in cls):
                cls.append(v)
                need -= 1
    return [sorted(c) for c in classes]


@given(graphs, st.integers(1, 4))
def test_duplicate_min_coverage_matches_naive(args, f_min):
    k, p, seed = args
    adj = random_graph(k, p, seed)
    groups, m = groups_from_colors(color(adj))
    classes = [torch.nonzero(groups[c]).flatten().tolist() for c in range(int(m))]
    dup = duplicate_min_coverage(groups, adj, f_min)
    got = [torch.nonzero(dup[c]).flatten().tolist() for c in range(int(m))]
    assert got == naive_duplicate(classes, adj, f_min)
    # groups stay conflict-free
    for c in range(int(m)):
        members = got[c]
        assert not any(bool(adj[i, j]) for i in members for j in members)


def test_bad_inputs():
    with pytest.raises(ValueError, match="adjacency"):
        color(torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="adjacency"):
        color([[0]])
    with pytest.raises(ValueError, match="min_updates"):
        duplicate_min_coverage(torch.eye(2, dtype=torch.bool), torch.zeros(2, 2), 0)
    with pytest.raises(ValueError, match="colors"):
        groups_from_colors(torch.zeros(2, 2))


def test_color_compiles_fullgraph():
    adj = random_graph(4, 0.5, 3)
    compiled = torch.compile(color, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(adj), color(adj))
