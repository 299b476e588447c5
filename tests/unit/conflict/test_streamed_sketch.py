"""``conflict.streamed_sketch``: the sketches projected leaf by leaf in one batched backward equal
``sketch`` of the rows from a per-task loop, and its Gramian the rows' Gramian."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradfn.conflict import sketch, streamed_sketch

F64 = torch.float64


@pytest.mark.parametrize(
    ("method", "chunk"), [("countsketch", None), ("countsketch", 7), ("rademacher", 5)]
)
def test_equals_the_sketch_of_the_rows(method, chunk):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).to(F64)
    params = list(model.parameters())
    out = model(torch.randn(8, 5, dtype=F64))
    losses = [(out[:, i] * (i + 1)).sin().sum() for i in range(4)]
    rows = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses]
    stacked = {f"{j:02d}": torch.stack([r[j] for r in rows]) for j in range(len(params))}
    want = sketch(stacked, 16, seed=3, method=method, chunk=chunk)
    got, gram = streamed_sketch(
        losses, params, 16, seed=3, method=method, chunk=chunk, retain_graph=True
    )
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    flat = torch.cat([v.reshape(4, -1) for v in stacked.values()], dim=1)
    torch.testing.assert_close(gram, flat @ flat.T, rtol=1e-12, atol=1e-12)
    alone, none = streamed_sketch(
        losses, params, 16, seed=3, method=method, chunk=chunk, retain_graph=True, gramian=False
    )
    assert none is None  # the sketches alone: the same, without the Gramian's work
    torch.testing.assert_close(alone, got, rtol=0, atol=0)
    other, _ = streamed_sketch(
        [x * 1.0 for x in losses], params, 16, seed=4, method=method, chunk=chunk
    )
    assert not torch.allclose(other, want)  # the seed matters: the test can tell them apart


def test_bad_arguments():
    p = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="dim"):
        streamed_sketch([p.sum()], [p], 0)
    with pytest.raises(ValueError, match="method"):
        streamed_sketch([p.sum()], [p], 4, method="gauss")
