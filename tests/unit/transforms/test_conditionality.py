"""``apply_if_finite``: a non-finite update is skipped (inner state kept, zeros out), against a
bias-corrected momentum written out by hand; ``select="where"`` and ``"host"`` agree bit for bit."""

from __future__ import annotations

import pytest
import torch

from gradfn.transforms import (
    ApplyIfFiniteState,
    GradientTransform,
    apply_if_finite,
    momentum,
)
from tests._utils.asserts import tree_equal

BETA = 0.5
NAN, INF = float("nan"), float("inf")
# the updates of five steps; steps 1 and 3 hold a NaN / an infinity
UPDATES = [
    [1.0, -2.0, 0.5],
    [3.0, NAN, 1.0],
    [0.5, 0.25, -1.0],
    [INF, 1.0, 2.0],
    [-1.0, 1.0, 4.0],
]


def _params():
    return {"x": torch.zeros(3)}


def _naive(updates):
    """Per step: (mu, count, output, skipped, num_skipped) of a skipping momentum, by hand."""
    mu, count, skipped_total, out = [0.0, 0.0, 0.0], 0, 0, []
    for u in updates:
        bad = any(v != v or abs(v) == INF for v in u)
        if bad:
            skipped_total += 1
            out.append((list(mu), count, [0.0, 0.0, 0.0], True, skipped_total))
            continue
        count += 1
        mu = [BETA * m + (1 - BETA) * v for m, v in zip(mu, u, strict=True)]
        corrected = [m / (1 - BETA**count) for m in mu]
        out.append((list(mu), count, corrected, False, skipped_total))
    return out


def _run(select):
    t = apply_if_finite(momentum(BETA), select=select)
    state = t.init(_params())
    trace = []
    for u in UPDATES:
        old = state
        state, out = t.update(state, {"x": torch.tensor(u)})
        trace.append((old, state, out))
    return trace


@pytest.mark.parametrize("select", ["where", "host"])
def test_skips_non_finite_updates_like_a_naive_loop(select):
    trace = _run(select)
    for step, ((old, new, out), want) in enumerate(zip(trace, _naive(UPDATES), strict=True)):
        mu, count, expected, skipped, num_skipped = want
        assert isinstance(new, ApplyIfFiniteState)
        assert new.skipped.dtype == torch.bool and new.skipped.shape == ()
        assert new.num_skipped.dtype == torch.int64 and new.num_skipped.shape == ()
        assert bool(new.skipped) is skipped, step
        assert int(new.num_skipped) == num_skipped, step
        assert int(new.inner.count) == count, step
        torch.testing.assert_close(new.inner.mu["x"], torch.tensor(mu), rtol=0, atol=1e-7)
        torch.testing.assert_close(out["x"], torch.tensor(expected), rtol=0, atol=1e-6)
        if skipped:
            assert torch.equal(out["x"], torch.zeros(3))  # exact zeros, never NaN
            assert tree_equal(new.inner, old.inner)  # the inner state is untouched
            if select == "host":
                assert new.inner is old.inner  # handed back as is, not copied


def test_where_and_host_give_identical_states_and_updates():
    for (_, s_where, o_where), (_, s_host, o_host) in zip(_run("where"), _run("host"), strict=True):
        assert tree_equal(s_where, s_host)
        assert tree_equal(o_where, o_host)


@pytest.mark.parametrize("select", ["where", "host"])
def test_nonfinite_flag_overrides_the_test_on_the_updates(select):
    t = apply_if_finite(momentum(BETA), select=select)
    state = t.init(_params())
    state, _ = t.update(state, {"x": torch.tensor([1.0, 2.0, 3.0])})
    # finite updates, flagged: skipped
    forced, out = t.update(
        state, {"x": torch.tensor([5.0, 5.0, 5.0])}, nonfinite=torch.tensor(True)
    )
    assert bool(forced.skipped) and int(forced.num_skipped) == 1
    assert tree_equal(forced.inner, state.inner)
    assert torch.equal(out["x"], torch.zeros(3))
    # a NaN, flagged finite: applied (the caller's flag is the test)
    let, out = t.update(state, {"x": torch.tensor([NAN, 0.0, 0.0])}, nonfinite=torch.tensor(False))
    assert not bool(let.skipped) and int(let.num_skipped) == 0
    assert int(let.inner.count) == 2
    assert bool(out["x"][0].isnan()) and float(out["x"][1]) == pytest.approx(
        BETA * (1 - BETA) * 2.0 / (1 - BETA**2)
    )


def test_extra_keywords_reach_the_inner_transform_but_not_the_flag():
    seen = []

    def update(state, updates, params=None, **extra):
        seen.append((params, extra))
        return state, updates

    t = apply_if_finite(GradientTransform(lambda p: (), update))
    params = _params()
    state = t.init(params)
    gram = torch.eye(2)
    t.update(state, {"x": torch.ones(3)}, params, gram=gram, nonfinite=torch.tensor(False))
    t.update(state, {"x": torch.ones(3)}, params, active=torch.ones(2, dtype=torch.bool))
    assert seen[0][0] is params and seen[0][1] == {"gram": gram}
    assert list(seen[1][1]) == ["active"]


def test_select_is_checked():
    with pytest.raises(ValueError, match="select"):
        apply_if_finite(momentum(BETA), select="sometimes")
