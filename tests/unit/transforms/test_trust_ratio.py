"""gradfn.transforms sign / trust ratio and Lion, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from gradfn.transforms import lion, sign_trust_ratio


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
