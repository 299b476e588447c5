"""``aggregators.backward(gramian="streaming")``: the same ``p.grad`` as the row path (float64),
against a naive oracle (per-task loop, weights from the Gramian, ``Σ_k w_k g_k``), in full and
trunk-only modes; the automatic choice; and its errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import gradfn.aggregators as A
from tests._utils.models import TrunkHeads

F64 = torch.float64
METHODS = ["upgrad", "mgda", "imtl_g", "dualproj", "aligned_mtl", "cagrad", "pcgrad", "nash_mtl"]


def setup(k: int, **kw):
    model = TrunkHeads(4, 6, k, out=2, dtype=F64, seed=k, **kw)
    x = torch.randn(7, 4, dtype=F64, generator=torch.Generator().manual_seed(k + 1))
    return model, x


def losses_of(model: TrunkHeads, x: torch.Tensor) -> list[torch.Tensor]:
    return [((i + 1) * y).sin().sum() for i, y in enumerate(model.head_outputs(x))]


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def assert_same(mine: dict, ref: dict, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    assert mine.keys() == ref.keys()
    for n in ref:
        if ref[n] is None:
            assert mine[n] is None, n
        else:
            torch.testing.assert_close(mine[n], ref[n], rtol=rtol, atol=atol, msg=n)


def run(model, x, method, **kw):
    model.zero_grad(set_to_none=True)
    _, out = A.backward(losses_of(model, x), model, method, **kw)
    return grads(model), out


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("method", METHODS)
def test_full_jacobian_matches_the_row_path(method, k):
    model, x = setup(k)
    ref, ref_out = run(model, x, method, gramian="rows")
    mine, out = run(model, x, method, gramian="streaming")
    # CAGrad's iterative solver amplifies the last bits of G
    tol = {"rtol": 1e-7, "atol": 1e-9} if method == "cagrad" else {}
    assert_same(mine, ref, **tol)
    torch.testing.assert_close(
        out.weights, ref_out.weights, **(tol or {"rtol": 1e-9, "atol": 1e-12})
    )
    assert_same(dict(out.grad), {n: ref_out.grad[n] for n in out.grad}, **tol)


@pytest.mark.parametrize("method", ["upgrad", "mgda", "imtl_g"])
def test_against_a_naive_oracle(method):
    """Per-task rows from a loop, ``w = weighting(J Jᵀ)``, ``.grad = Σ_k w_k g_k``."""
    model, x = setup(3)
    params = list(model.parameters())
    losses = losses_of(model, x)
    rows = [
        torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses
    ]
    flat = torch.stack(
        [
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for g, p in zip(r, params, strict=True)
                ]
            )
            for r in rows
        ]
    )
    agg = A.aggregator(method)
    _, w = agg.weighting(agg.init(3), flat @ flat.T)
    want = w @ flat
    mine, _ = run(model, x, method, gramian="streaming")
    got = torch.cat([mine[n].reshape(-1) for n, _ in model.named_parameters()])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["upgrad", "mgda", "imtl_g"])
def test_trunk_only_matches_the_row_path(method):
    model, x = setup(3, partial=2)  # `pair` is read by heads 0 and 1 only
    ref, _ = run(model, x, method, gramian="rows", shared=lambda n: not n.startswith("heads"))
    mine, _ = run(model, x, method, gramian="streaming", shared=lambda n: not n.startswith("heads"))
    assert_same(mine, ref)


def test_unused_parameters_keep_their_grad_and_existing_grads_accumulate():
    model, x = setup(3, unused=True, partial=1)
    before = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters()}
    outs = {}
    for path in ("rows", "streaming"):
        m = copy.deepcopy(model)
        for n, p in m.named_parameters():
            p.grad = before[n].clone() if n.startswith(("unused", "heads.0")) else None
        A.backward(losses_of(m, x), m, "upgrad", gramian=path)
        outs[path] = grads(m)
    assert torch.equal(outs["streaming"]["unused.weight"], before["unused.weight"])
    assert_same(outs["streaming"], outs["rows"])


def test_a_task_that_reaches_nothing_gets_a_zero_row():
    model, x = setup(2)
    mine, ref = {}, {}
    for path, box in (("rows", ref), ("streaming", mine)):
        model.zero_grad(set_to_none=True)
        losses = [*losses_of(model, x), torch.ones((), dtype=F64)]
        _, out = A.backward(losses, model, "upgrad", gramian=path)
        box.update(grads(model), w=out.weights)
    assert_same(mine, ref)


def test_auto_switches_over_the_budget_and_says_so():
    model, x = setup(3)
    ref, _ = run(model, x, "upgrad", gramian="rows")
    with pytest.warns(UserWarning, match="streaming"):
        mine, _ = run(model, x, "upgrad", memory_budget=64)
    assert_same(mine, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(model, x, "upgrad", memory_budget=2**30)  # the rows fit: no warning
        run(model, x, "upgrad")  # the CPU: no budget, the rows
        run(model, x, "graddrop", memory_budget=64)  # needs the rows: it keeps them


def test_non_finite_gradient_raises_and_writes_nothing():
    a = torch.zeros(2, dtype=F64, requires_grad=True)  # sqrt'(0) = inf, sqrt(0) finite
    b = torch.ones(2, dtype=F64, requires_grad=True)
    for shared in (None, [a]):
        with pytest.raises(ValueError, match=r"non-finite per-task gradient for \['a'\]"):
            A.backward(
                [a.sqrt().sum() + b.sum(), (2 * a + b).sum()],
                {"a": a, "b": b},
                "upgrad",
                gramian="streaming",
                shared=shared,
            )
        assert a.grad is None and b.grad is None


def test_errors():
    model, x = setup(2)
    with pytest.raises(ValueError, match="graddrop"):
        A.backward(losses_of(model, x), model, "graddrop", gramian="streaming")
    h = model.trunk(x)
    with pytest.raises(ValueError, match="features"):
        A.backward([h.sum(), h.pow(2).sum()], model, "upgrad", features=h, gramian="streaming")
    with pytest.raises(ValueError, match="strategy"):
        A.backward(losses_of(model, x), model, "upgrad", strategy="loop", gramian="streaming")
    with pytest.raises(ValueError, match="gramian"):
        A.backward(losses_of(model, x), model, "upgrad", gramian="rowz")
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="memory_budget"):
            A.backward(losses_of(model, x), model, "upgrad", memory_budget=bad)
