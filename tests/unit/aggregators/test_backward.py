"""``aggregators.backward`` against independent oracles: TorchJD's ``backward`` /
``mtl_backward`` + ``jac_to_grad`` with the same aggregator, and a naive per-task loop."""

from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as tjd
from torchjd.autojac import backward as tjd_backward
from torchjd.autojac import jac_to_grad, mtl_backward

import gradfn.aggregators as A
from tests._utils.models import TrunkHeads
from tests.unit.aggregators._common import F64

# (gradfn method, its hyper-parameters, the TorchJD aggregator); PCGrad only at K = 2, where the
# projection order does not matter
METHODS = {
    "upgrad": ({}, tjd.UPGrad),
    "mgda": ({"solver": "frank_wolfe"}, tjd.MGDA),
    "pcgrad": ({}, tjd.PCGrad),
}


def setup(k: int, seed: int = 0, **kw):
    model = TrunkHeads(4, 6, k, out=2, dtype=F64, seed=seed, **kw)
    x = torch.randn(7, 4, dtype=F64, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


def losses_of(model: TrunkHeads, x: torch.Tensor) -> list[torch.Tensor]:
    return [((i + 1) * y).sin().sum() for i, y in enumerate(model.head_outputs(x))]


def grads_of(model: TrunkHeads) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def assert_same(mine: dict, ref: dict) -> None:
    assert mine.keys() == ref.keys()
    for n in ref:
        if ref[n] is None:
            assert mine[n] is None, n
        else:
            torch.testing.assert_close(mine[n], ref[n], rtol=1e-9, atol=1e-12, msg=n)


CASES = [(m, k, s) for m in METHODS for k in (2, 3) for s in ("loop", "vmap")]
CASES = [c for c in CASES if not (c[0] == "pcgrad" and c[1] != 2)]


@pytest.mark.parametrize(("method", "k", "strategy"), CASES)
def test_full_jacobian_matches_torchjd_backward(method, k, strategy):
    hp, tjd_agg = METHODS[method]
    model, x = setup(k)
    params = list(model.parameters())
    tjd_backward(losses_of(model, x), inputs=params)
    jac_to_grad(params, tjd_agg())
    ref = grads_of(model)
    model.zero_grad(set_to_none=True)
    A.backward(losses_of(model, x), model, method, strategy=strategy, **hp)
    assert_same(grads_of(model), ref)


@pytest.mark.parametrize(("method", "k", "strategy"), CASES)
@pytest.mark.parametrize("how", ["shared_module", "shared_predicate", "features"])
def test_trunk_only_matches_torchjd_mtl_backward(method, k, strategy, how):
    hp, tjd_agg = METHODS[method]
    model, x = setup(k, partial=1)
    trunk = [p for n, p in model.named_parameters() if n.startswith("trunk")]
    h = model.features(x)
    ys = [((i + 1) * y).sin().sum() for i, y in enumerate(_heads_from(model, h))]
    mtl_backward(ys, features=h, shared_params=trunk)
    jac_to_grad(trunk, tjd_agg())
    ref = grads_of(model)
    model.zero_grad(set_to_none=True)
    h = model.features(x)
    ls = [((i + 1) * y).sin().sum() for i, y in enumerate(_heads_from(model, h))]
    kw = {
        "shared_module": {"shared": model.trunk},
        "shared_predicate": {"shared": lambda n: n.startswith("trunk")},
        "features": {"features": h},
    }[how]
    _, out = A.backward(ls, model, method, strategy=strategy, **kw, **hp)
    assert set(out.grad) == {n for n, _ in model.named_parameters() if n.startswith("trunk")}
    assert_same(grads_of(model), ref)


def _heads_from(model: TrunkHeads, h: torch.Tensor) -> list[torch.Tensor]:
    return [model._head(h, i) for i in range(model.num_heads)]


def test_dict_tuple_and_tensor_losses_match_the_naive_loop():
    model, x = setup(3)
    params = list(model.parameters())
    ls = losses_of(model, x)
    rows = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in ls]
    flat = [
        [torch.zeros_like(p) if g is None else g for g, p in zip(r, params, strict=True)]
        for r in rows
    ]
    j = torch.stack([torch.cat([g.reshape(-1) for g in r]) for r in flat])
    d = A.upgrad({"j": j}).grad["j"]
    ref = list(d.split([p.numel() for p in params]))
    for form in ("dict", "tuple", "tensor"):
        model.zero_grad(set_to_none=True)
        ls = losses_of(model, x)
        given = {
            "dict": dict(zip("abc", ls, strict=True)),
            "tuple": tuple(ls),
            "tensor": torch.stack(ls),
        }
        A.backward(given[form], model, "upgrad")
        for p, r in zip(params, ref, strict=True):
            torch.testing.assert_close(p.grad.reshape(-1), r, rtol=1e-9, atol=1e-12)


def test_accumulates_and_keeps_unreached_grads():
    model, x = setup(2, unused=True)
    model.unused.weight.grad = torch.ones_like(model.unused.weight)
    A.backward(losses_of(model, x), model, "mean")
    first = grads_of(model)
    A.backward(losses_of(model, x), model, "mean")
    for n, g in grads_of(model).items():
        if n.startswith("unused.weight"):
            torch.testing.assert_close(g, torch.ones_like(g))
        elif n.startswith("unused"):
            assert g is None
        else:
            torch.testing.assert_close(g, 2 * first[n])


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("constant", [torch.ones((), dtype=F64), "detached"])
def test_a_constant_loss_is_a_zero_row(strategy, constant):
    """A loss with no graph (a constant, or a detached value) among others is a valid input: its
    row of the Jacobian is zero, so ``mean`` gives half the other task's gradient."""
    model, x = setup(2)
    live = losses_of(model, x)[1]
    dead = live.detach() if constant == "detached" else constant
    _, out = A.backward([dead, live], model, "mean", strategy=strategy)
    ref = torch.autograd.grad(
        losses_of(model, x)[1] / 2, list(model.parameters()), allow_unused=True
    )
    for (n, p), r in zip(model.named_parameters(), ref, strict=True):
        if r is None:
            assert p.grad is None, n
        else:
            torch.testing.assert_close(p.grad, r, rtol=1e-9, atol=1e-12, msg=n)
    assert out.weights.shape == (2,)


@pytest.mark.parametrize("shared", [False, True])
def test_non_finite_gradient_writes_nothing(shared):
    model, x = setup(2)
    ls = losses_of(model, x)
    w = model.heads[1].weight
    bad = ls[1] + (w - w.detach()).abs().sum().sqrt()  # finite value, NaN gradient
    assert torch.isfinite(bad)
    kw = {"shared": model.trunk} if shared else {}
    with pytest.raises(ValueError, match=r"non-finite per-task gradient for \['heads.1.weight'\]"):
        A.backward([ls[0], bad], model, "upgrad", **kw)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"losses": []}, ValueError, "`losses` is empty"),
        ({"losses": "ab"}, TypeError, "`losses`"),
        ({"losses": [1.0, 2.0]}, TypeError, r"`losses\[0\]`"),
        ({"losses": {"a": torch.ones(2)}}, ValueError, r"`losses\['a'\]` must be a scalar"),
        ({"params": 3}, TypeError, "`params`"),
        ({"shared": 3}, TypeError, "`shared`"),
        ({"shared": lambda n: False}, ValueError, "`shared` selects none"),
        ({"shared": [torch.ones(2, requires_grad=True)]}, ValueError, "not among `params`"),
        ({"features": torch.ones(2)}, ValueError, "`features`"),
        ({"strategy": "fast"}, ValueError, "strategy"),
    ],
)
def test_errors_name_the_argument(kwargs, err, match):
    model, x = setup(2)
    call = {"losses": losses_of(model, x), "params": model, **kwargs}
    ls, params = call.pop("losses"), call.pop("params")
    with pytest.raises(err, match=match):
        A.backward(ls, params, "upgrad", **call)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", sorted(A.METHODS))
@pytest.mark.parametrize("shared", [False, True])
def test_every_method_matches_its_update_on_a_naive_loop(method, shared):
    """Each task's gradient from its own forward and backward, stacked, through the aggregator's
    ``update`` (its per-leaf path): what ``backward`` writes, for every method."""
    model, x = setup(3, partial=2)
    names = [n for n, _ in model.named_parameters()]
    trunk = [n for n in names if n.startswith("trunk")]
    agg = A.aggregator(method)
    rows = []
    for k in range(3):
        loss = losses_of(model, x)[k]
        rows.append(torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))
    stacked = {
        n: torch.stack([torch.zeros_like(p) if r[i] is None else r[i] for r in rows])
        for i, (n, p) in enumerate(model.named_parameters())
    }
    picked = {n: stacked[n] for n in (trunk if shared else names)}
    _, ref = agg.update(agg.init(3), picked)
    state, out = A.backward(losses_of(model, x), model, agg, shared=model.trunk if shared else None)
    # CAGrad's iterative inner solver turns the last-bit differences between the two Gramians
    # (stacked vs one leaf at a time) into ~1e-10 relative differences (seen on one CPU)
    rtol = 1e-7 if method == "cagrad" else 1e-9
    torch.testing.assert_close(out.weights, ref.weights, rtol=rtol, atol=1e-12)
    for n, p in model.named_parameters():
        want = ref.grad[n] if n in picked else stacked[n].sum(0)
        torch.testing.assert_close(p.grad, want, rtol=rtol, atol=1e-12, msg=n)
    torch.testing.assert_close(
        torch.as_tensor(out.grad[trunk[0]]), torch.as_tensor(ref.grad[trunk[0]])
    )
    assert type(state) is type(agg.init(3))


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_mixed_dtypes_match_the_update_on_a_naive_loop(strategy):
    """A float64 head beside float32 layers: no shared (K, n) buffer, the per-leaf path."""
    model = TrunkHeads(4, 6, 3, out=2, double_last_head=True, seed=0)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    params = list(model.parameters())
    rows = []
    for k in range(3):
        loss = model.head_outputs(x)[k].sin().sum()
        rows.append(torch.autograd.grad(loss, params, allow_unused=True))
    stacked = {
        n: torch.stack([torch.zeros_like(p) if r[i] is None else r[i] for r in rows])
        for i, (n, p) in enumerate(model.named_parameters())
    }
    _, ref = A.aggregator("upgrad").update(A.EmptyState(), stacked)
    A.backward([y.sin().sum() for y in model.head_outputs(x)], model, "upgrad", strategy=strategy)
    for n, p in model.named_parameters():
        assert p.grad.dtype == p.dtype
        torch.testing.assert_close(p.grad, ref.grad[n].to(p.dtype), msg=n)


@pytest.mark.parametrize("shared", [False, True])
def test_sparse_embedding_gradients_match_dense(shared):
    class Model(torch.nn.Module):
        def __init__(self, sparse: bool) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.emb = torch.nn.Embedding(10, 4, sparse=sparse, dtype=F64)
            torch.nn.init.normal_(self.emb.weight, generator=g)
            self.heads = torch.nn.ModuleList(torch.nn.Linear(4, 1, dtype=F64) for _ in range(2))

    idx = torch.tensor([1, 2, 2, 7])
    got = {}
    for sparse in (True, False):
        torch.manual_seed(0)
        model = Model(sparse)
        h = model.emb(idx)
        losses = [head(h).tanh().sum() for head in model.heads]
        kw = {"shared": model.emb} if shared else {}
        A.backward(losses, model, "upgrad", strategy="loop", **kw)
        got[sparse] = {n: p.grad.to_dense() for n, p in model.named_parameters()}
        if sparse:
            h = model.emb(idx)
            losses = [head(h).tanh().sum() for head in model.heads]
            with pytest.raises(RuntimeError, match="strategy='loop'"):
                A.backward(losses, model, "upgrad", strategy="vmap", **kw)
    assert_same(got[True], got[False])


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_two_feature_tensors_match_torchjd(strategy):
    """``features=[h1, h2]``: each head reads both (TorchJD's ``features`` as a sequence)."""
    model, x = setup(3)
    trunk = [p for n, p in model.named_parameters() if n.startswith("trunk")]

    def losses(h1, h2):
        return [((i + 1) * model._head(h1 + h2.tanh(), i)).sin().sum() for i in range(3)]

    h = model.features(x)
    h1, h2 = h * 2, h**2
    mtl_backward(losses(h1, h2), features=[h1, h2])
    jac_to_grad(trunk, tjd.UPGrad())
    ref = grads_of(model)
    model.zero_grad(set_to_none=True)
    h = model.features(x)
    h1, h2 = h * 2, h**2
    A.backward(losses(h1, h2), model, "upgrad", features=[h1, h2], strategy=strategy)
    assert_same(grads_of(model), ref)
