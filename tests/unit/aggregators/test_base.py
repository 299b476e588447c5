"""The Aggregator protocol: ``init`` takes ``K`` or a task-stacked pytree, and for every Gramian
weighting ``weighting(state, gram, active=...)`` gives the weights and next state of
``update(state, grads, active=...)``, over several steps of the stateful methods."""

from __future__ import annotations

import pytest
import torch

import gradfn.aggregators as A
from tests._utils.asserts import tree_equal
from tests.unit.aggregators._common import F64, jac

WEIGHTINGS = [m for m in A.METHODS if A.aggregator(m).weighting is not None]
MASKS = [
    torch.tensor([True, True, True, True]),
    torch.tensor([True, False, True, True]),
    torch.tensor([False, True, True, False]),
    None,
    torch.tensor([True, True, False, True]),
]


def test_every_method_but_graddrop_is_a_weighting():
    # documented: "weighting ... or None (not a weighting)", None for GradDrop only
    assert [m for m in A.METHODS if m not in WEIGHTINGS] == ["graddrop"]
    assert {m for m in A.METHODS if A.aggregator(m).stateful} == {
        "pcgrad",
        "graddrop",
        "gradvac",
        "nash_mtl",
        "inverse_norm",
    }


@pytest.mark.parametrize("method", A.METHODS)
def test_init_takes_k_or_a_task_stacked_pytree(method):
    agg = A.aggregator(method)
    stacked = {"a": torch.zeros(4, 2, 3), "b": [torch.zeros(4), torch.zeros(4, 5, dtype=F64)]}
    from_k, from_tree = agg.init(4), agg.init(stacked)
    assert tree_equal(from_k, from_tree)
    assert tree_equal(agg.init(4, device="cpu"), from_k)
    # either state drives an update over K = 4 rows
    rows = {"w": jac(1, 4, 6)}
    assert tree_equal(agg.update(from_k, rows), agg.update(from_tree, rows))
    with pytest.raises(TypeError, match="tasks"):
        agg.init(True)
    with pytest.raises(ValueError):
        agg.init(0)
    with pytest.raises(ValueError, match="leading axis"):
        agg.init({"a": torch.zeros(4, 2), "b": torch.zeros(3, 2)})


def _rows(step: int) -> dict[str, torch.Tensor]:
    j = jac(40 + step, 4, 9)
    return {"a": j[:, :4].reshape(4, 2, 2), "b": j[:, 4:]}


def _flat_rows(rows: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([rows["a"].reshape(4, -1), rows["b"]], dim=1)


@pytest.mark.parametrize("method", WEIGHTINGS)
def test_weighting_gives_the_weights_and_state_of_update(method):
    agg = A.aggregator(method)
    s_update = s_weighting = agg.init(4)
    for step, active in enumerate(MASKS):
        rows = _rows(step)
        j = _flat_rows(rows)
        s_update, out = agg.update(s_update, rows, active=active)
        s_weighting, w = agg.weighting(s_weighting, j @ j.T, active=active)  # Gramian by hand
        torch.testing.assert_close(w, out.weights, rtol=1e-9, atol=1e-12)
        if active is not None:
            assert bool((w[~active] == 0).all()), method
        torch.testing.assert_close(_flat_rows_sum(out.grad), out.weights @ j, rtol=1e-9, atol=1e-12)
        assert out.rows is None
        _assert_states_close(s_weighting, s_update)


def _flat_rows_sum(grad: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grad["a"].reshape(-1), grad["b"]])


def _assert_states_close(a, b) -> None:
    assert type(a) is type(b)
    for x, y in zip(a, b, strict=True):
        if x.is_floating_point():
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)
        else:
            assert torch.equal(x, y)


@pytest.mark.parametrize("method", WEIGHTINGS)
def test_update_with_a_given_gram_is_the_weighting_of_that_gram(method):
    agg = A.aggregator(method)
    rows = _rows(0)
    j = _flat_rows(rows)
    gram = j @ j.T
    active = MASKS[1]
    s1, out = agg.update(agg.init(4), rows, active=active, gram=gram)
    s2, w = agg.weighting(agg.init(4), gram, active=active)
    assert torch.equal(out.weights, w)
    assert tree_equal(s1, s2)
