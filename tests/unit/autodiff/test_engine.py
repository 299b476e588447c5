"""The per-task gradient engine against a naive oracle: one forward and one
``torch.autograd.grad`` per task, on the module itself."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from gradfn.autodiff import (
    accumulate_per_task_grads,
    functional_loss,
    per_task_grads,
    split_module,
    value_and_per_task_grads,
    value_and_weighted_grad,
)
from tests._utils.models import TrunkHeads

STRATEGIES = ["vmap", "loop", "auto"]


def trunk_heads(k: int = 3, seed: int = 0) -> TrunkHeads:
    """Shared trunk (with BatchNorm and a frozen layer), K heads (one in float64), unused params."""
    return TrunkHeads(
        5,
        8,
        k,
        batchnorm=True,
        frozen_input=True,
        unused=True,
        double_last_head=True,
        seed=seed,
    )


def task_losses(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    x, y = batch
    outs = [out.squeeze(-1) for out in model.head_outputs(x)]
    return {f"task{i}": ((out - y[i].to(out.dtype)) ** 2).mean() for i, out in enumerate(outs)}


def naive_grads(model: nn.Module, batch, names: list[str]) -> dict[str, torch.Tensor]:
    """K separate forward + backward passes (what the reference implementations do)."""
    params = dict(model.named_parameters())
    rows = []
    k = len(model.heads)
    for i in range(k):
        m = copy.deepcopy(model)  # keep BatchNorm statistics out of the comparison
        p = dict(m.named_parameters())
        loss = list(task_losses(m, batch).values())[i]
        g = torch.autograd.grad(loss, [p[n] for n in names], allow_unused=True)
        rows.append(
            [
                torch.zeros_like(params[n]) if gi is None else gi
                for gi, n in zip(g, names, strict=True)
            ]
        )
    return {n: torch.stack([r[j] for r in rows]) for j, n in enumerate(names)}


def make_batch(k: int, d_in: int = 5, b: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d_in, generator=g), torch.randn(k, b, generator=g)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_module_grads_match_naive_oracle(strategy):
    model = trunk_heads(k=3, seed=0)
    batch = make_batch(3)
    params, f = functional_loss(model, task_losses, freeze_running_stats=True)
    assert "frozen.weight" not in params and "unused.weight" in params
    losses, grads = value_and_per_task_grads(f, params, batch, strategy=strategy)
    oracle = naive_grads(model, batch, list(params))
    assert losses.shape == (3,)
    expected_losses = torch.stack(
        [v.double() for v in task_losses(copy.deepcopy(model), batch).values()]
    )
    torch.testing.assert_close(losses.double(), expected_losses)
    for name in params:
        assert grads[name].shape == (3, *params[name].shape)
        assert grads[name].dtype == params[name].dtype  # float64 head stays float64
        torch.testing.assert_close(grads[name], oracle[name], atol=1e-5, rtol=1e-4)
    assert torch.count_nonzero(grads["unused.weight"]) == 0
    # head i only receives task i's gradient
    assert torch.count_nonzero(grads["heads.0.weight"][1:]) == 0


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_running_stats_updated_once_or_frozen(strategy):
    model = trunk_heads(k=2, seed=1)
    batch = make_batch(2)
    reference = copy.deepcopy(model)
    reference(batch[0])  # one train-mode forward updates the statistics once
    params, f = functional_loss(model, task_losses)
    per_task_grads(f, params, batch, strategy=strategy)
    bn, bn_ref = model.trunk[1], reference.trunk[1]
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var)
    assert bn.num_batches_tracked.item() == 1

    frozen_model = trunk_heads(k=2, seed=8)
    before = {n: b.clone() for n, b in frozen_model.named_buffers()}
    params, f = functional_loss(frozen_model, task_losses, freeze_running_stats=True)
    per_task_grads(f, params, batch, strategy=strategy)
    for n, b in frozen_model.named_buffers():
        assert torch.equal(b, before[n])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_wrt_restricts_to_shared_params(strategy):
    model = trunk_heads(k=3, seed=2)
    batch = make_batch(3)
    params, f = functional_loss(model, task_losses, freeze_running_stats=True)
    grads = per_task_grads(
        f, params, batch, wrt=lambda n: n.startswith("trunk."), strategy=strategy
    )
    assert set(grads) == {n for n in params if n.startswith("trunk.")}
    oracle = naive_grads(model, batch, list(grads))
    for name in grads:
        torch.testing.assert_close(grads[name], oracle[name], atol=1e-5, rtol=1e-4)


def mlp_losses(params, batch):
    x, ys = batch
    h = torch.tanh(x @ params["w1"].T + params["b1"])
    out = h @ params["heads"].T  # (B, K)
    return ((out - ys) ** 2).mean(dim=0)  # 1-D tensor of K losses


@given(
    k=st.integers(1, 6),
    d_in=st.integers(1, 5),
    hidden=st.integers(1, 7),
    b=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_strategies_agree_with_oracle_on_random_shapes(k, d_in, hidden, b, seed):
    g = torch.Generator().manual_seed(seed)
    params = {
        "w1": torch.randn(hidden, d_in, generator=g),
        "b1": torch.randn(hidden, generator=g),
        "heads": torch.randn(k, hidden, generator=g),
    }
    batch = (torch.randn(b, d_in, generator=g), torch.randn(b, k, generator=g))
    leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    oracle = {n: [] for n in params}
    for i in range(k):
        loss = mlp_losses(leaves, batch)[i]
        gi = torch.autograd.grad(loss, list(leaves.values()))
        for n, v in zip(leaves, gi, strict=True):
            oracle[n].append(v)
    for strategy in ("vmap", "loop"):
        losses, grads = value_and_per_task_grads(mlp_losses, params, batch, strategy=strategy)
        assert losses.shape == (k,)
        for n in params:
            torch.testing.assert_close(grads[n], torch.stack(oracle[n]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_task_batched_form_is_vmap_of_grad(strategy):
    g = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(4, 3, generator=g), "v": torch.randn(4, generator=g)}
    k = 5
    batch = {"x": torch.randn(k, 6, 3, generator=g), "y": torch.randn(k, 6, generator=g)}

    def loss(p, b):
        return ((torch.tanh(b["x"] @ p["w"].T) @ p["v"] - b["y"]) ** 2).mean()

    losses, grads = value_and_per_task_grads(
        loss, params, batch, task_batched=True, strategy=strategy
    )
    for i in range(k):
        leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        li = loss(leaves, {"x": batch["x"][i], "y": batch["y"][i]})
        gi = torch.autograd.grad(li, list(leaves.values()))
        torch.testing.assert_close(losses[i], li.detach())
        for n, v in zip(leaves, gi, strict=True):
            torch.testing.assert_close(grads[n][i], v, atol=1e-5, rtol=1e-4)


def test_weighted_grad_is_one_backward_of_the_weighted_sum():
    model = trunk_heads(k=3, seed=4)
    batch = make_batch(3)
    params, f = functional_loss(model, task_losses, freeze_running_stats=True)
    w = torch.tensor([1.0, 0.0, 2.5])
    losses, grad = value_and_weighted_grad(f, params, batch, w)
    stacked = per_task_grads(f, params, batch, strategy="loop")
    for n in params:
        expected = sum(w[i].to(stacked[n].dtype) * stacked[n][i] for i in range(3))
        torch.testing.assert_close(grad[n], expected, atol=1e-5, rtol=1e-4)
    assert losses.shape == (3,)


def test_has_aux_returns_aux():
    params = {"w": torch.ones(2)}

    def f(p, x):
        out = x @ p["w"]
        return (out, 2 * out), {"pred": out}

    (losses, aux), grads = value_and_per_task_grads(f, params, torch.ones(2), has_aux=True)
    assert torch.equal(losses, torch.tensor([2.0, 4.0]))
    assert torch.equal(aux["pred"], torch.tensor(2.0))
    assert torch.equal(grads["w"], torch.tensor([[1.0, 1.0], [2.0, 2.0]]))


def test_compiled_vmap_path_fullgraph_matches_eager():
    g = torch.Generator().manual_seed(5)
    params = {
        "w1": torch.randn(6, 4, generator=g),
        "b1": torch.randn(6, generator=g),
        "heads": torch.randn(3, 6, generator=g),
    }
    batch = (torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g))

    def step(p, b):
        return value_and_per_task_grads(mlp_losses, p, b, strategy="vmap")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    l1, g1 = compiled(params, batch)
    l2, g2 = value_and_per_task_grads(mlp_losses, params, batch, strategy="loop")
    torch.testing.assert_close(l1, l2)
    for n in params:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-5, rtol=1e-4)


def test_compiled_with_default_backend():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(6)
    params = {
        "w1": torch.randn(5, 3, generator=g),
        "b1": torch.randn(5, generator=g),
        "heads": torch.randn(2, 5, generator=g),
    }
    batch = (torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g))
    compiled = torch.compile(
        lambda p, b: per_task_grads(mlp_losses, p, b, strategy="auto"), fullgraph=True
    )
    out = compiled(params, batch)
    ref = per_task_grads(mlp_losses, params, batch, strategy="loop")
    for n in params:
        torch.testing.assert_close(out[n], ref[n], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# bad input


def test_empty_task_set_is_an_error():
    with pytest.raises(ValueError, match="empty set of task losses"):
        per_task_grads(lambda p, b: {}, {"w": torch.ones(1)}, None)


def test_non_scalar_loss_is_an_error():
    with pytest.raises(ValueError, match="must be a scalar"):
        per_task_grads(lambda p, b: [p["w"] * 2, p["w"].sum()], {"w": torch.ones(3)}, None)
    with pytest.raises(ValueError, match="1-D tensor"):
        per_task_grads(lambda p, b: p["w"].reshape(1, 2), {"w": torch.ones(2)}, None)


def test_mismatched_k_is_an_error():
    with pytest.raises(ValueError, match="num_tasks"):
        per_task_grads(lambda p, b: p["w"] * 1.0, {"w": torch.ones(3)}, None, num_tasks=4)
    batch = {"x": torch.ones(3, 2), "y": torch.ones(4)}
    with pytest.raises(ValueError, match="batch"):
        per_task_grads(lambda p, b: p["w"].sum(), {"w": torch.ones(2)}, batch, task_batched=True)


def test_predicate_selecting_nothing_is_an_error():
    with pytest.raises(ValueError, match="`wrt` selects no parameter"):
        per_task_grads(lambda p, b: p["w"] * 1.0, {"w": torch.ones(2)}, None, wrt=lambda n: False)


def test_bad_strategy_and_loss_types():
    with pytest.raises(ValueError, match="strategy"):
        per_task_grads(lambda p, b: p["w"] * 1.0, {"w": torch.ones(2)}, None, strategy="fast")
    with pytest.raises(TypeError, match="loss_fn"):
        per_task_grads(lambda p, b: 3.0, {"w": torch.ones(2)}, None)
    with pytest.raises(TypeError, match="module"):
        split_module(object())


def test_split_module_separates_frozen_and_buffers():
    model = trunk_heads(k=2)
    params, buffers = split_module(model)
    assert "frozen.weight" in buffers and "trunk.1.running_mean" in buffers
    assert all(not p.requires_grad for p in params.values())
    assert params["trunk.0.weight"].data_ptr() == model.trunk[0].weight.data_ptr()


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_accumulate_adds_scaled_rows_in_place(strategy):
    model = trunk_heads(k=3, seed=7)
    params, f = functional_loss(model, task_losses, freeze_running_stats=True)
    batches = [make_batch(3, seed=s) for s in (1, 2)]
    into = {n: torch.ones((3, *p.shape), dtype=torch.float64) for n, p in params.items()}
    for b in batches:
        losses = accumulate_per_task_grads(f, params, b, into, scale=0.5, strategy=strategy)
        assert losses.shape == (3,)
    expected = {n: torch.ones_like(v) for n, v in into.items()}
    for b in batches:
        oracle = naive_grads(model, b, list(params))
        for n in params:
            expected[n] += 0.5 * oracle[n].double()
    for n in params:
        torch.testing.assert_close(into[n], expected[n], atol=1e-5, rtol=1e-5)
    # rows of parameters a task does not use keep their value
    assert torch.equal(into["heads.0.weight"][1], torch.ones_like(into["heads.0.weight"][1]))


def test_accumulate_rejects_mismatched_buffers():
    params = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="into"):
        accumulate_per_task_grads(
            lambda p, b: [p["w"].sum()], params, None, {"w": torch.zeros(1, 3)}
        )
    with pytest.raises(ValueError, match="into"):
        accumulate_per_task_grads(
            lambda p, b: [p["w"].sum(), p["w"].prod()], params, None, {"w": torch.zeros(3, 2)}
        )


@pytest.mark.parametrize("both", [True, False])
def test_loop_keeps_sparse_gradients(both):
    """A sparse embedding: stacked sparse when every task reaches it (as ``torch.stack`` of the
    rows), dense with a zero row otherwise; the values are those of a dense embedding."""
    w = torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([1, 2, 2, 7])

    def f(p, b, sparse=True):
        e = torch.nn.functional.embedding(b, p["w"], sparse=sparse)
        second = (e**2).sum() if both else p["v"].sum()
        return [e[:, 0].sum(), second]

    params = {"w": w, "v": torch.ones(2, dtype=torch.float64)}
    _, got = value_and_per_task_grads(f, params, idx, strategy="loop")
    _, ref = value_and_per_task_grads(
        lambda p, b: f(p, b, sparse=False), params, idx, strategy="loop"
    )
    assert got["w"].is_sparse == both
    torch.testing.assert_close(got["w"].to_dense(), ref["w"])


def test_loop_workspace_receives_the_rows_and_matches_fresh_rows():
    model = trunk_heads(3)
    params, f = functional_loss(model, task_losses)
    batch = make_batch(3)
    ws = {n: torch.full((3, *p.shape), float("nan"), dtype=p.dtype) for n, p in params.items()}
    _, fresh = value_and_per_task_grads(f, params, batch, strategy="loop", tasks=[2, 0])
    _, got = value_and_per_task_grads(f, params, batch, strategy="loop", tasks=[2, 0], workspace=ws)
    for n in params:
        assert got[n].data_ptr() == ws[n].data_ptr()  # rows written into the buffers
        assert got[n].shape == fresh[n].shape == (2, *params[n].shape)
        assert torch.equal(got[n], fresh[n])  # unreached rows zeroed, not left as NaN
    with pytest.raises(ValueError, match="workspace"):
        value_and_per_task_grads(
            f, params, batch, strategy="loop", workspace={n: w[:1] for n, w in ws.items()}
        )
    with pytest.raises(ValueError, match="workspace"):
        value_and_per_task_grads(
            f, params, batch, strategy="loop", workspace={"x": ws["trunk.0.weight"]}
        )
