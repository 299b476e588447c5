"""gradfn.tree against naive flattened-vector oracles."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradfn import tree


def _random_stacked(k: int, shapes: list[tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn((k, *s), generator=g) for i, s in enumerate(shapes)}


def _flat(stacked: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    return torch.cat([v.reshape(k, -1) for v in stacked.values()], dim=1)


shapes_st = st.lists(
    st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4
)


@given(k=st.integers(1, 6), shapes=shapes_st, seed=st.integers(0, 2**16))
def test_gramian_matches_concatenated_jacobian(k, shapes, seed):
    stacked = _random_stacked(k, shapes, seed)
    j = _flat(stacked, k).double()
    torch.testing.assert_close(tree.gramian(stacked, torch.float64), j @ j.T)


@given(k=st.integers(1, 6), shapes=shapes_st, seed=st.integers(0, 2**16))
def test_weighted_sum_and_combine(k, shapes, seed):
    stacked = _random_stacked(k, shapes, seed)
    w = torch.randn(k, generator=torch.Generator().manual_seed(seed + 1))
    out = tree.weighted_sum(stacked, w)
    naive = {n: sum(w[i] * v[i] for i in range(k)) for n, v in stacked.items()}
    for n in stacked:
        torch.testing.assert_close(out[n], naive[n], atol=1e-5, rtol=1e-5)
    c = torch.randn(3, k, generator=torch.Generator().manual_seed(seed + 2))
    comb = tree.combine(c, stacked)
    torch.testing.assert_close(_flat(comb, 3), c @ _flat(stacked, k), atol=1e-5, rtol=1e-5)


def test_stack_unstack_roundtrip_and_num_tasks():
    trees = [
        {"a": torch.full((2,), float(i)), "b": torch.full((1, 3), -float(i))} for i in range(4)
    ]
    stacked = tree.stack(trees)
    assert tree.num_tasks(stacked) == 4
    assert stacked["a"].shape == (4, 2) and stacked["b"].shape == (4, 1, 3)
    back = tree.unstack(stacked)
    for t0, t1 in zip(trees, back, strict=True):
        for n in t0:
            assert torch.equal(t0[n], t1[n])


def test_num_tasks_rejects_inconsistent_axis():
    with pytest.raises(ValueError, match="leading axis"):
        tree.num_tasks({"a": torch.zeros(3, 2), "b": torch.zeros(2, 2)})


def test_dot_norm_and_nonfinite():
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([[2.0]])}
    b = {"x": torch.tensor([3.0, -1.0]), "y": torch.tensor([[0.5]])}
    assert tree.tree_dot(a, b).item() == pytest.approx(1 * 3 - 2 + 1)
    assert tree.tree_norm(a).item() == pytest.approx(3.0)
    assert not tree.tree_any_nonfinite(a).item()
    a["y"] = torch.tensor([[float("nan")]])
    assert tree.tree_any_nonfinite(a).item()


def test_partition_by_dotted_name():
    params = {"trunk.0.weight": 1, "head.a.weight": 2, "trunk.0.bias": 3}
    sel, rest = tree.partition(params, lambda n: n.startswith("trunk."))
    assert list(sel) == ["trunk.0.weight", "trunk.0.bias"] and list(rest) == ["head.a.weight"]
    with pytest.raises(TypeError, match="predicate"):
        tree.partition(params, "trunk")


def test_weighted_sum_rejects_wrong_k():
    with pytest.raises(ValueError, match="weights"):
        tree.weighted_sum({"a": torch.zeros(3, 2)}, torch.ones(2))
