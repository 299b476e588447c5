"""The gradient-transform protocol: chain, stateless, identity."""

from __future__ import annotations

import pytest
import torch

from gradfn.transforms import (
    EmptyState,
    GradientTransform,
    chain,
    identity,
    momentum,
    norm_cap,
    stateless,
)


def test_chain_order_and_compile():
    t = chain(norm_cap(1.0), momentum(0.5))
    assert isinstance(t, GradientTransform)
    s = t.init({"x": torch.zeros(2)})
    s, out = t.update(s, {"x": torch.tensor([3.0, 4.0])})
    assert torch.allclose(out["x"], torch.tensor([0.6, 0.8]), atol=1e-6)
    step = torch.compile(t.update, fullgraph=True, backend="aot_eager")
    s2, out2 = step(t.init({"x": torch.zeros(2)}), {"x": torch.tensor([3.0, 4.0])})
    assert torch.allclose(out2["x"], out["x"]) and int(s2[1].count) == 1
    with pytest.raises(TypeError, match="GradientTransform"):
        chain(lambda x: x)


def _recorder(log, name, scale):
    """A transform that records what it receives and multiplies the updates by ``scale``."""

    def init(params):
        return torch.zeros((), dtype=torch.int64)

    def update(state, updates, params=None, **extra):
        log.append((name, params, extra))
        return state + 1, {n: scale * u for n, u in updates.items()}

    return GradientTransform(init, update)


def test_chain_passes_params_and_extra_keywords_to_every_link():
    log = []
    t = chain(_recorder(log, "a", 2.0), _recorder(log, "b", 3.0), _recorder(log, "c", 0.5))
    params = {"x": torch.ones(2)}
    state = t.init(params)
    assert isinstance(state, tuple) and len(state) == 3
    gram, active = torch.eye(3), torch.tensor([True, False, True])
    state, out = t.update(state, {"x": torch.tensor([1.0, -1.0])}, params, gram=gram, active=active)
    assert [name for name, _, _ in log] == ["a", "b", "c"]
    for _, p, extra in log:
        assert p is params
        assert extra.keys() == {"gram", "active"}
        assert extra["gram"] is gram and extra["active"] is active
    assert torch.equal(out["x"], torch.tensor([3.0, -3.0]))  # 2 · 3 · 0.5
    assert [int(s) for s in state] == [1, 1, 1]
    log.clear()
    t.update(state, {"x": torch.ones(2)})  # no params, no extras: every link gets None and {}
    assert [(p, extra) for _, p, extra in log] == [(None, {})] * 3


def test_stateless_calls_fn_with_updates_and_params():
    seen = []

    def fn(updates, params):
        seen.append(params)
        return {n: u - params[n] for n, u in updates.items()}

    t = stateless(fn)
    params = {"x": torch.tensor([1.0, 2.0])}
    state = t.init(params)
    assert state == EmptyState() and state == ()
    new, out = t.update(state, {"x": torch.tensor([5.0, 5.0])}, params, gram=torch.eye(2))
    assert new == EmptyState() and seen == [params]
    assert torch.equal(out["x"], torch.tensor([4.0, 3.0]))


def test_identity_returns_its_updates():
    t = identity()
    updates = {"x": torch.tensor([1.0, float("nan")])}
    state = t.init(updates)
    new, out = t.update(state, updates, None, active=torch.ones(1, dtype=torch.bool))
    assert new == EmptyState() and out is updates
    # neutral in a chain
    c = chain(identity(), momentum(0.5), identity())
    s = c.init({"x": torch.zeros(2)})
    s, o = c.update(s, {"x": torch.tensor([3.0, 4.0])})
    assert torch.equal(o["x"], torch.tensor([3.0, 4.0])) and int(s[1].count) == 1
