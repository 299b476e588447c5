"""Every loss weighting: positive finite weights for losses across orders of magnitude, K = 1,
states that survive non-finite losses, and the value-based ones under torch.compile."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradfn.weighting as W

VALUE_BASED = ("dwa", "rlw", "famo")
LEARNED = ("uncertainty", "imtl_l")


def _run(method: str, rows: list[list[float]]) -> list[torch.Tensor]:
    m = W.weighting(method)
    k = len(rows[0])
    state = m.init(k)
    s = m.init_params(k) if m.init_params is not None else None
    out = []
    for row in rows:
        state, w = m.update(state, torch.tensor(row), s)
        out.append(w.detach())
    return out


@pytest.mark.parametrize("method", VALUE_BASED + LEARNED)
@given(
    st.lists(
        st.lists(st.floats(-6, 6), min_size=3, max_size=3).map(lambda r: [10.0**x for x in r]),
        min_size=1,
        max_size=5,
    )
)
def test_weights_are_positive_and_finite(method, rows):
    for w in _run(method, rows):
        assert bool(torch.isfinite(w).all())
        # DWA's softmax of loss ratios may underflow to 0 when a loss jumps by orders of magnitude
        assert bool((w >= 0).all()) if method == "dwa" else bool((w > 0).all())
        if method == "dwa":
            torch.testing.assert_close(w.sum(), torch.tensor(float(len(w))))


@pytest.mark.parametrize("method", VALUE_BASED + LEARNED)
def test_one_task(method):
    for w in _run(method, [[2.0], [1.0], [0.5], [0.25]]):
        torch.testing.assert_close(w, torch.ones(1))


@pytest.mark.parametrize("method", VALUE_BASED)
def test_a_nonfinite_loss_never_reaches_the_state(method):
    m = W.weighting(method)
    state = m.init(2)
    for row in ([1.0, 2.0], [float("nan"), 1.0], [float("inf"), 1.0], [0.5, 1.5]):
        state, w = m.update(state, torch.tensor(row))
        assert bool(torch.isfinite(w).all())
        for leaf in state:
            assert bool(torch.isfinite(leaf.double()).all())


def test_update_compiles_fullgraph():
    """FAMO (the most involved: softmax, Adam, masks); DWA and RLW use the same kinds of op."""
    torch._dynamo.reset()
    m = W.famo()
    state = m.init(3)
    compiled = torch.compile(m.update, fullgraph=True, backend="aot_eager")
    ref = state
    for row in ([1.0, 2.0, 3.0], [0.9, 1.5, 3.1], [0.5, float("nan"), 2.0], [0.4, 1.0, 2.5]):
        losses = torch.tensor(row)
        state, got = compiled(state, losses)
        ref, want = m.update(ref, losses)
        torch.testing.assert_close(got, want)
        for x, y in zip(state, ref, strict=True):
            torch.testing.assert_close(x, y)


@pytest.mark.parametrize("method", ("famo", "gradnorm", "uncertainty"))
def test_weighted_loss_module_checkpoints_its_state(method, tmp_path):
    k = 3
    layer = torch.nn.Linear(2, 2)
    a = W.WeightedLoss(W.weighting(method), k, layer=layer)
    x = torch.randn(4, 2)
    for _ in range(3):
        out = layer(x)
        a([(out[:, 0] ** 2).mean(), (out[:, 1] ** 2).mean(), out.abs().mean()]).backward()
    torch.save(a.state_dict(), tmp_path / "w.pt")
    b = W.WeightedLoss(W.weighting(method), k, layer=layer)
    b.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    assert type(b.state) is type(a.state)
    for x_, y_ in zip(
        torch.utils._pytree.tree_leaves(b.state),
        torch.utils._pytree.tree_leaves(a.state),
        strict=True,
    ):
        torch.testing.assert_close(x_, y_)


@pytest.mark.parametrize("method", W.METHODS)
def test_a_numpy_task_count_is_the_int(method):
    import numpy as np

    m = W.weighting(method)
    got, want = m.init(np.int64(3)), m.init(3)
    for x_, y_ in zip(
        torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want), strict=True
    ):
        assert torch.equal(x_, y_)
    if m.init_params is not None:
        assert m.init_params(np.int64(3)).shape == (3,)
    with pytest.raises(TypeError, match="tasks"):
        m.init(np.bool_(True))


@pytest.mark.parametrize("method", VALUE_BASED)
def test_the_wrong_number_of_losses_fails_naming_them(method):
    m = W.weighting(method)
    with pytest.raises(ValueError, match="`losses` has 2 tasks"):
        m.update(m.init(3), torch.ones(2))
