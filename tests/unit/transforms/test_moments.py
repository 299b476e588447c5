"""gradfn.transforms norm EMA and bias-corrected momentum, by hand."""

from __future__ import annotations

import pytest
import torch

from gradfn.transforms import momentum, norm_ema


def test_norm_ema_by_hand():
    t = norm_ema(0.9, num_tasks=2, eps=1e-3)
    s = t.init({"w": torch.zeros(3)})
    assert torch.equal(s.ema, torch.ones(2))
    u = {"w": torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])}
    s, out = t.update(s, u)
    assert out is u
    assert torch.allclose(s.ema, torch.tensor([0.9 + 0.1 * 5.0, 0.9]))
    for _ in range(200):
        s, _ = t.update(s, {"w": torch.zeros(2, 3)})
    assert torch.allclose(s.ema, torch.full((2,), 1e-3))  # floored at eps
    g = norm_ema(0.5)
    s = g.init({"w": torch.zeros(2)})
    s, _ = g.update(s, {"w": torch.tensor([6.0, 8.0])})
    assert s.ema.shape == () and float(s.ema) == pytest.approx(0.5 + 0.5 * 10.0)
    with pytest.raises(ValueError, match="beta"):
        norm_ema(1.0)


def test_bias_corrected_momentum_by_hand():
    b = 0.8
    t = momentum(b)
    s = t.init({"x": torch.zeros(2)})
    gs = [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5]), torch.tensor([-1.0, 1.0])]
    m = torch.zeros(2)
    for step, g in enumerate(gs, start=1):
        s, out = t.update(s, {"x": g})
        m = b * m + (1 - b) * g
        assert int(s.count) == step
        assert torch.allclose(s.mu["x"], m)
        assert torch.allclose(out["x"], m / (1 - b**step))
    # first step of a bias-corrected EMA returns the gradient itself
    s0 = t.init({"x": torch.zeros(2)})
    _, out = t.update(s0, {"x": gs[0]})
    assert torch.allclose(out["x"], gs[0])
    # without bias correction: M itself; beta = 0: the gradient
    tn = momentum(b, bias_correction=False)
    _, out = tn.update(tn.init({"x": torch.zeros(2)}), {"x": gs[0]})
    assert torch.allclose(out["x"], (1 - b) * gs[0])
    t0 = momentum(0.0)
    _, out = t0.update(t0.init({"x": torch.zeros(2)}), {"x": gs[1]})
    assert torch.equal(out["x"], gs[1])
    with pytest.raises(ValueError, match="beta"):
        momentum(-0.1)


def test_momentum_bfloat16_storage():
    t = momentum(0.9, dtype=torch.bfloat16)
    s = t.init({"x": torch.zeros(3)})
    s, out = t.update(s, {"x": torch.tensor([1.0, 1e-3, 300.0])})
    assert s.mu["x"].dtype == torch.bfloat16 and out["x"].dtype == torch.bfloat16
    expected = (0.1 * torch.tensor([1.0, 1e-3, 300.0])).to(torch.bfloat16)
    assert torch.equal(s.mu["x"], expected)
