"""Aggregators on by-hand 2×2 cases: g1 = (1, 0), g2 = (-1, 1) (conflicting) unless stated."""

from __future__ import annotations

import math

import pytest
import torch

import gradfn.aggregators as A
from tests.unit.aggregators._common import F64

G1, G2 = [1.0, 0.0], [-1.0, 1.0]
R2 = math.sqrt(2.0)


@pytest.mark.parametrize(
    ("method", "kwargs", "expected"),
    [
        ("mean", {}, [0.0, 0.5]),
        ("sum", {}, [0.0, 1.0]),
        ("pcgrad", {}, [0.5, 1.5]),  # g1' = (.5,.5), g2' = (0,1), any order
        ("gradvac", {}, [0.5, 1.5]),  # first step, zero targets: same corrections as PCGrad
        ("mgda", {}, [0.2, 0.4]),  # w = (0.6, 0.4)
        ("upgrad", {"reg_eps": 0.0}, [0.25, 0.75]),  # (.25,.25) + (0,.5)
        ("dualproj", {"reg_eps": 0.0}, [0.0, 0.5]),  # the mean is already in the dual cone
        ("imtl_g", {}, [1 / (3 + 2 * R2), (1 + R2) / (3 + 2 * R2)]),
        ("config", {}, [(1 + R2) / (4 + 2 * R2), (1 + R2) ** 2 / (4 + 2 * R2)]),
    ],
)
def test_by_hand_2x2(method, kwargs, expected):
    grads = {"w": torch.tensor([G1, G2], dtype=F64)}
    agg = A.aggregator(method, **kwargs)
    _, out = agg.update(agg.init(2), grads)
    torch.testing.assert_close(out.grad["w"], torch.tensor(expected, dtype=F64))


def test_by_hand_2x2_orthogonal():
    grads = {"w": torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64)}
    # Nash: α_i = 1/‖g_i‖ → (1, 1); clipped to norm 1
    _, out = A.aggregator("nash_mtl", max_norm=0.0).update(A.nash_mtl_init(2), grads)
    torch.testing.assert_close(out.grad["w"], torch.tensor([1.0, 1.0], dtype=F64))
    _, out = A.aggregator("nash_mtl").update(A.nash_mtl_init(2), grads)
    torch.testing.assert_close(out.grad["w"], torch.tensor([1.0, 1.0], dtype=F64) / R2)
    # Aligned-MTL: B = diag(1, 1/2) on λ = (1, 4) → w = (1/2, 1/4)
    torch.testing.assert_close(A.aligned_mtl(grads).weights, torch.tensor([0.5, 0.25], dtype=F64))
    # CAGrad on G = I: w = (1/2 + c/2)·1
    eye = torch.eye(2, dtype=F64)
    torch.testing.assert_close(A.cagrad_weights(eye, c=0.5), torch.tensor([0.75, 0.75], dtype=F64))


def test_by_hand_graddrop():
    grads = {"w": torch.tensor([[1.0, -2.0], [-3.0, -1.0]], dtype=F64)}
    # P = (0.25, 0); with U = 0.5 both coordinates keep the negative entries
    out = A.graddrop(grads, noise={"w": torch.tensor([0.5, 0.5], dtype=F64)})
    torch.testing.assert_close(out.grad["w"], torch.tensor([-3.0, -3.0], dtype=F64))
    torch.testing.assert_close(out.rows["w"], torch.tensor([[0.0, -2.0], [-3.0, -1.0]], dtype=F64))
