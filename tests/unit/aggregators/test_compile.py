"""Every aggregator's update traces with ``torch.compile(fullgraph=True)`` and matches eager.

Iteration counts are reduced to keep compile time low; the traced program is the same one.
"""

from __future__ import annotations

import pytest
import torch

import gradfn.aggregators as A

SMALL = {
    "mgda": {"iters": 4},
    "upgrad": {"iters": 4},
    "dualproj": {"iters": 4},
    "cagrad": {"iters": 1, "qp_iters": 2},
    "nash_mtl": {"iters": 4},
    "gcond": {"max_iters": 2},
}


def _grads(k: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(k, 3, 5, generator=g), "b": torch.randn(k, 7, generator=g)}


@pytest.mark.parametrize("method", A.METHODS)
def test_update_compiles_fullgraph(method):
    torch._dynamo.reset()
    agg = A.aggregator(method, **SMALL.get(method, {}))
    grads = _grads()
    active = torch.tensor([True, True, False, True])
    state = agg.init(4)

    def step(state, grads, active):
        return agg.update(state, grads, active=active)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got_state, got = compiled(state, grads, active)
    ref_state, ref = step(state, grads, active)
    for name in grads:
        torch.testing.assert_close(got.grad[name], ref.grad[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.weights, ref.weights, rtol=1e-5, atol=1e-6)
    for x, y in zip(got_state, ref_state, strict=True):
        torch.testing.assert_close(x, y)


def test_aggregator_compiles_with_inductor():
    torch._dynamo.reset()
    g = _grads()
    fn = torch.compile(lambda x: A.imtl_g(x), fullgraph=True)
    got = fn(g)
    ref = A.imtl_g(g)
    torch.testing.assert_close(got.weights, ref.weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.grad["a"], ref.grad["a"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["mgda", "imtl_g", "gradvac"])
def test_two_tasks_compiled_tensor_path_matches_eager_closed_form(method):
    # eagerly on the CPU K = 2 runs in Python floats; compiled, the tensor path
    torch._dynamo.reset()
    agg = A.aggregator(method, **SMALL.get(method, {}))
    grads = _grads(2)
    state = agg.init(2)
    compiled = torch.compile(agg.update, fullgraph=True, backend="aot_eager")
    got_state, got = compiled(state, grads)
    ref_state, ref = agg.update(state, grads)
    torch.testing.assert_close(got.weights, ref.weights, rtol=1e-5, atol=1e-6)
    for x, y in zip(got_state, ref_state, strict=True):
        torch.testing.assert_close(x, y)
