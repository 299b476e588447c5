"""``aggregators.aggregator``: building aggregators by name, and bad input."""

from __future__ import annotations

import pytest
import torch

import gradfn.aggregators as A


# gcond forwards its keywords to the resolution: an unknown one fails at the first update
@pytest.mark.parametrize("method", [m for m in A.METHODS if m != "gcond"])
def test_aggregator_rejects_unknown_hyper_parameters_when_built(method):
    # a typo used to pass silently until the first update (inside a training loop)
    with pytest.raises(TypeError, match="reg_esp"):
        A.aggregator(method, reg_esp=1e-4)


def test_aggregator_accepts_its_documented_hyper_parameters():
    for method, hp in [
        ("upgrad", {"reg_eps": 1e-4}),
        ("cagrad", {"c": 0.4}),
        ("pcgrad", {"seed": 3}),
        ("graddrop", {"seed": 1}),
        ("gradvac", {"beta": 0.1, "seed": 2}),
        ("nash_mtl", {"max_norm": 0.0}),
        ("mgda", {"solver": "frank_wolfe", "max_iters": 50}),
        ("config", {"rcond": 1e-6}),
        ("gcond", {"thresholds": (-0.9, -0.5, 0.0)}),
    ]:
        agg = A.aggregator(method, **hp)
        _, out = agg.update(agg.init(3), {"w": torch.randn(3, 4)})
        assert out.weights.shape == (3,) or method == "graddrop"


def test_bad_input_errors():
    with pytest.raises(ValueError, match="gram"):
        A.upgrad_weights(torch.ones(2, 3))
    with pytest.raises(TypeError, match="floating"):
        A.mean({"w": torch.ones(2, 3, dtype=torch.int64)})
    with pytest.raises(ValueError, match="unknown method"):
        A.aggregator("nope")
    with pytest.raises(ValueError, match="active"):
        A.mgda_weights(torch.eye(3), active=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="pref"):
        A.upgrad_weights(torch.eye(3), pref=torch.ones(2))
    with pytest.raises(ValueError, match="leading axis"):
        A.mean({"a": torch.ones(2, 3), "b": torch.ones(3, 3)})
    with pytest.raises(ValueError, match="state is for"):
        A.gradvac_weights(A.gradvac_init(2), torch.eye(3))
