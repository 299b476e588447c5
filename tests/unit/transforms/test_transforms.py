"""gradfn.transforms: norm cap, norm EMA, bias-corrected momentum, Lion / trust ratio, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from gradfn.transforms import (
    GradientTransform,
    chain,
    lion,
    momentum,
    norm_cap,
    norm_ema,
    sign_trust_ratio,
)


def _params():
    return {"w": torch.tensor([[3.0, -4.0]]), "b": torch.tensor([0.0, 0.0])}


def test_norm_cap_global_and_per_task():
    t = norm_cap(1.0, eps=0.0)
    u = {"w": torch.tensor([[3.0, 0.0]]), "b": torch.tensor([4.0, 0.0])}  # ||u|| = 5
    _, out = t.update(t.init(_params()), u)
    assert torch.allclose(out["w"], torch.tensor([[0.6, 0.0]]))
    assert torch.allclose(out["b"], torch.tensor([0.8, 0.0]))
    small = {"w": torch.tensor([[0.3, 0.0]]), "b": torch.tensor([0.4, 0.0])}
    _, out = t.update(t.init(_params()), small)  # never scales up
    assert torch.equal(out["w"], small["w"]) and torch.equal(out["b"], small["b"])
    # per task: rows of the leading axis clipped separately, with the reference's +eps
    tk = norm_cap(2.0, per_task=True, eps=1e-8)
    stacked = {"w": torch.tensor([[6.0, 8.0], [1.0, 0.0]])}  # norms 10 and 1
    _, out = tk.update(tk.init({"w": torch.zeros(2)}), stacked)
    assert torch.allclose(out["w"][0], torch.tensor([6.0, 8.0]) * 2.0 / (10.0 + 1e-8))
    assert torch.equal(out["w"][1], torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="max_norm"):
        norm_cap(0.0)


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


def test_sign_trust_ratio_by_hand():
    coef, clip = 1e-2, 3.0
    t = sign_trust_ratio(coef, clip)
    params = {"w": torch.tensor([[3.0, -4.0]]), "b": torch.tensor([0.0, 0.0]), "c": torch.ones(4)}
    u = {
        "w": torch.tensor([[0.5, -0.0]]),  # ||p|| = 5, ||u|| = 0.5 -> tau = 10 -> clipped to 3
        "b": torch.tensor([1.0, -1.0]),  # ||p|| = 0 -> tau = 1
        "c": torch.tensor([2.0, -2.0, 2.0, 0.0]),  # ||p|| = 2, ||u|| = sqrt(12)
    }
    _, out = t.update(t.init(params), u, params)
    assert torch.allclose(out["w"], torch.tensor([[1.0, 0.0]]) * 3.0 * coef)
    assert torch.allclose(out["b"], torch.tensor([1.0, -1.0]) * coef)
    tau = 2.0 / math.sqrt(12.0)
    assert torch.allclose(out["c"], torch.tensor([1.0, -1.0, 1.0, 0.0]) * tau * coef)
    with pytest.raises(ValueError, match="params"):
        t.update(t.init(params), u)
    with pytest.raises(ValueError, match="coef"):
        sign_trust_ratio(0.0)


def test_lion_is_sign_of_bias_corrected_momentum_with_trust():
    b, coef, clip = 0.5, 1e-3, 100.0
    t = lion(b, coef, clip)
    params = {"w": torch.tensor([2.0, 0.0, -1.0])}
    s = t.init(params)
    g1, g2 = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([-3.0, 1.0, 0.5])
    s, _ = t.update(s, {"w": g1}, params)
    s, out = t.update(s, {"w": g2}, params)
    m = (b * (1 - b) * g1 + (1 - b) * g2) / (1 - b**2)
    tau = min(float(params["w"].norm() / m.norm()), clip)
    assert torch.allclose(out["w"], torch.sign(m) * tau * coef)
    assert isinstance(s, tuple) and int(s[0].count) == 2


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
