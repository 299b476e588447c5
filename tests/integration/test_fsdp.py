"""gradfn.integrations.fsdp on two real processes (FSDP2 ``fully_shard`` on a gloo CPU mesh).

The oracle is one process on the union of the two ranks' batches: per-task gradients by a naive
loop of ``autograd.grad``, ``G = J Jᵀ`` by hand, ``w`` from the aggregator's weighting, ``wᵀ J``.
The control (``all_reduce=False``, each rank's partial Gramian only) must miss it.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from gradfn.aggregators import aggregator
from gradfn.integrations.fsdp import per_task_backward
from tests._utils.two_ranks import run_two_ranks

K, BATCH, STEPS = 3, 8, 2


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, K))  # 3 rows: uneven shards


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + step)
    x = torch.randn(BATCH, 5, generator=g)
    y = torch.randn(BATCH, K, generator=g) * torch.tensor([1.0, -3.0, 0.5])
    return x, y


def _losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    out = model(x)
    return [(out[:, k] - y[:, k]).pow(2).mean() + 0.3 * out.mean() * k for k in range(K)]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2,))
        result: dict[str, object] = {}
        for mode, kept in ((True, False), (False, False), ("kept", True)):
            model = _model()
            fully_shard(model[0], mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            state, weights = None, []
            for step in range(STEPS):
                x, y = _data(step)
                half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
                opt.zero_grad()
                state, agg = per_task_backward(
                    _losses(model, x[half], y[half]),
                    model,
                    "upgrad",
                    state=state,
                    all_reduce=bool(mode),
                    keep_unsharded=kept,
                )
                weights.append(agg.weights.clone())
                if step == 0:
                    result[f"grad{mode}"] = {
                        n: p.grad.full_tensor().clone() for n, p in model.named_parameters()
                    }
                opt.step()
            result[f"w{mode}"] = torch.stack(weights)
            result[f"params{mode}"] = {
                n: p.full_tensor().detach().clone() for n, p in model.named_parameters()
            }
        result["refused"] = _refusals(mesh)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _refusals(mesh) -> list[str]:
    """The paths without FSDP support refuse a sharded model with NotImplementedError."""
    from torch.distributed.fsdp import fully_shard

    from gradfn import GradientConductor, SonGokuScheduler, TaskSpec
    from gradfn.aggregators import backward

    model = _model()
    fully_shard(model, mesh=mesh)
    x, y = _data(0)
    fn = {f"t{k}": (lambda m, b, k=k: _losses(m, *b)[k]) for k in range(K)}
    attempts = [
        lambda: SonGokuScheduler(
            model, [TaskSpec(n, f) for n, f in fn.items()], torch.optim.SGD(model.parameters())
        ),
        lambda: GradientConductor(model, fn, dict.fromkeys(fn, 1.0), accumulation_steps=K),
        lambda: backward(_losses(model, x, y), model, "upgrad"),
    ]
    out = []
    for attempt in attempts:
        try:
            attempt()
            out.append("accepted")
        except NotImplementedError as err:
            out.append(str(err))
    return out


def _oracle() -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One process, the union batch: naive per-task loop, hand Gramian, weighting, SGD."""
    model = _model()
    agg = aggregator("upgrad")
    state = agg.init(K)
    weights, first = [], {}
    for step in range(STEPS):
        x, y = _data(step)
        losses = _losses(model, x, y)
        params = list(model.parameters())
        rows = [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
            for loss in losses
        ]
        jac = torch.stack(rows)
        state, w = agg.weighting(state, jac @ jac.T)
        d = w @ jac
        weights.append(w)
        offset = 0
        with torch.no_grad():
            for n, p in model.named_parameters():
                g = d[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                if step == 0:
                    first[n] = g.clone()
                p -= 0.1 * g
    return torch.stack(weights), first, {n: p.detach() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_two_ranks(_worker)


def test_ranks_take_identical_decisions_equal_to_one_process(ranks):
    w0, w1 = ranks[0]["wTrue"], ranks[1]["wTrue"]
    assert torch.equal(w0, w1)  # bit-identical weights on both ranks, every step
    w, grad, params = _oracle()
    assert not torch.allclose(w[0], torch.full((K,), w[0].mean().item()), atol=1e-3)  # not trivial
    torch.testing.assert_close(w0, w, rtol=1e-5, atol=1e-6)
    for r in ranks:
        for n in grad:
            torch.testing.assert_close(r["gradTrue"][n], grad[n], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(r["paramsTrue"][n], params[n], rtol=1e-5, atol=1e-6)


def test_keep_unsharded_changes_only_the_communication(ranks):
    for r in ranks:
        assert torch.equal(r["wkept"], r["wTrue"])
        for n in r["gradTrue"]:
            torch.testing.assert_close(r["gradkept"][n], r["gradTrue"][n], rtol=1e-6, atol=1e-7)


def test_control_without_the_gramian_all_reduce_fails(ranks):
    w, grad, _ = _oracle()
    w0, w1 = ranks[0]["wFalse"], ranks[1]["wFalse"]
    assert not torch.allclose(w0, w1, atol=1e-3)  # each rank decides from its own shard
    for wr in (w0, w1):
        assert not torch.allclose(wr[0], w[0], atol=1e-3)
    assert any(not torch.allclose(ranks[0]["gradFalse"][n], grad[n], atol=1e-4) for n in grad)


def test_paths_without_fsdp_support_refuse_a_sharded_model(ranks):
    for r in ranks:
        assert len(r["refused"]) == 3
        for message in r["refused"]:
            assert "fully_shard" in message and "per_task_backward" in message, message
            assert "songoku_backward" in message and "conductor_backward" in message, message


def test_without_process_group_is_the_row_path():
    model = _model()
    x, y = _data(0)
    _, agg = per_task_backward(_losses(model, x, y), model, "upgrad")
    w, grad, _ = _oracle()
    torch.testing.assert_close(agg.weights, w[0])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grad[n])
    # p.grad accumulates, as loss.backward() does
    per_task_backward(_losses(model, x, y), model, "upgrad")
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * grad[n])


def test_bad_input():
    model = _model()
    x, y = _data(0)
    with pytest.raises(ValueError, match="needs the full per-task rows"):
        per_task_backward(_losses(model, x, y), model, "graddrop")
    with pytest.raises(TypeError, match="`model`"):
        per_task_backward(_losses(model, x, y), [torch.zeros(2)], "upgrad")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`keep_unsharded`"):
        per_task_backward(_losses(model, x, y), model, "upgrad", keep_unsharded=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`all_reduce`"):
        per_task_backward(_losses(model, x, y), model, "upgrad", all_reduce=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`losses`"):
        per_task_backward([], model, "upgrad")
