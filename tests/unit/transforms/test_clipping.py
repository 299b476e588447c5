"""gradfn.transforms norm cap, by hand."""

from __future__ import annotations

import pytest
import torch

from gradfn.transforms import norm_cap


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
