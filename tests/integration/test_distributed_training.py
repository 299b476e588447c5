"""Training under torch.distributed: 2 gloo processes (loopback, spawned here) against one process.

Each scenario trains a few steps; rank ``r`` sees slice ``r`` of every step's batch. With
mean-reduced losses the average of the ranks' gradients is the gradient on the union of the
slices, so the oracle is the same scenario run in this process, without a process group, on the
whole batch. Asserted: both ranks hold bit-identical states and parameters, equal (to tolerance)
to the oracle's. All scenarios run inside one pair of spawned workers (spawning is the slow part).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

from gradfn import aggregators
from gradfn.adapters import GradientConductor, SonGokuScheduler, TaskSpec
from gradfn.algorithms import conductor, songoku
from gradfn.integrations.distributed import make_reducer
from tests._utils.asserts import assert_trees_close, assert_trees_equal
from tests._utils.models import TrunkHeads
from tests._utils.two_ranks import run_two_ranks

K = 3
BATCH = 8  # global batch per step; each of the 2 ranks gets 4 rows
STEPS = 5


def _batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``rank`` of ``world`` equal slices of step ``step``'s global batch: ``x (B, 4), y (B, K)``.

    Task 1's target is minus task 0's, so their gradients conflict and the colouring splits them.
    """
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, 4, generator=g, dtype=torch.float64)
    w = torch.randn(4, generator=g, dtype=torch.float64)
    y = torch.stack([x @ w, -(x @ w), torch.sin(x[:, 0])], dim=1)
    size = BATCH // world
    sl = slice(rank * size, (rank + 1) * size)
    return x[sl], y[sl]


def Net() -> TrunkHeads:
    """A float64 ``Linear(4, 6) → tanh`` trunk and ``K`` scalar heads; ``model(x)`` is ``(B, K)``."""
    return TrunkHeads(4, 6, K, dtype=torch.float64, seed=0)


def _functional_loss(params, batch):
    x, y = batch
    z = torch.tanh(x @ params["trunk.0.weight"].T + params["trunk.0.bias"])
    out = torch.stack(
        [z @ params[f"heads.{k}.weight"][0] + params[f"heads.{k}.bias"][0] for k in range(K)],
        dim=1,
    )
    return ((out - y) ** 2).mean(dim=0)


def _task_loss(k: int):
    def loss_fn(model, batch):
        x, y = batch
        return ((model(x)[:, k] - y[:, k]) ** 2).mean()

    return loss_fn


def _songoku_functional(rank: int, world: int, reduce, **kw) -> dict:
    params = {n: p.detach().clone() for n, p in Net().named_parameters()}
    tx = songoku(
        _functional_loss,
        num_tasks=K,
        shared=lambda n: n.startswith("trunk"),
        refresh_period=2,
        tau_schedule=0.0,
        reduce=reduce,
        **kw,
    )
    state = tx.init(params)
    groups = []
    for t in range(STEPS):
        state, grads = tx.update(state, params, _batch(t, rank, world))
        params = {n: p - 0.1 * grads[n] for n, p in params.items()}
        groups.append(state.active.clone())
    return {"state": state._asdict(), "params": params, "active": torch.stack(groups)}


def _songoku_adapter(rank: int, world: int, wrap, **kw) -> dict:
    model = Net()
    if wrap:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tasks = [TaskSpec(f"t{k}", _task_loss(k)) for k in range(K)]
    sched = SonGokuScheduler(model, tasks, opt, refresh_period=2, tau_schedule=None, **kw)
    for t in range(STEPS):
        x, y = _batch(t, rank, world)
        sched.step({f"t{k}": (x, y) for k in range(K)})
    module = model.module if wrap else model
    params = {n: p.detach().clone() for n, p in module.named_parameters()}
    return {"state": sched.state._asdict(), "params": params}


def _micro(cycle: int, rank: int, world: int, n: int) -> list:
    return [_batch(100 + n * cycle + i, rank, world) for i in range(n)]


def _conductor_functional(rank: int, world: int, reduce, **kw) -> dict:
    params = {n: p.detach().clone() for n, p in Net().named_parameters()}
    tx = conductor(_functional_loss, [1.0, 0.5, 1.0], accumulation_steps=3, reduce=reduce, **kw)
    state = tx.init(params)
    for c in range(STEPS):
        state, grads = tx.update(state, params, _micro(c, rank, world, 3))
        params = {n: p - 0.1 * grads[n] for n, p in params.items()}
    return {"state": state._asdict(), "params": params}


def _conductor_adapter(rank: int, world: int, wrap, **kw) -> dict:
    model = Net()
    if wrap:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fns = {
        f"t{k}": (lambda out, y, k=k: ((out[:, k] - y[:, k]) ** 2).mean()) for k in range(K)
    }
    gc = GradientConductor(model, loss_fns, {f"t{k}": 1.0 for k in range(K)}, 3, **kw)
    for c in range(STEPS):
        opt.zero_grad()
        gc.step(iter(_micro(c, rank, world, 3)).__next__)
        opt.step()
    module = model.module if wrap else model
    params = {n: p.detach().clone() for n, p in module.named_parameters()}
    return {"state": gc.state._asdict(), "params": params}


def _conductor_two_cycles(rank: int, world: int, **kw) -> dict:
    """A cycle, then one whose second micro-batch is non-finite on the last rank only."""
    model = Net()
    loss_fns = {
        f"t{k}": (lambda out, y, k=k: ((out[:, k] - y[:, k]) ** 2).mean()) for k in range(K)
    }
    gc = GradientConductor(
        model, loss_fns, {f"t{k}": 1.0 for k in range(K)}, 3, stochastic_accumulation=False, **kw
    )
    gc.step(iter(_micro(0, rank, world, 3)).__next__)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    micro = _micro(1, rank, world, 3)
    if rank == world - 1:
        x, y = micro[1]
        micro[1] = (x.clone().fill_(float("nan")), y)
    stats = gc.step(iter(micro).__next__)
    return {
        "grads": grads,
        "skipped": torch.tensor(stats["skipped"]),
        "num_skipped": gc.state.num_skipped.clone(),
        "grad_none": torch.tensor(all(p.grad is None for p in model.parameters())),
    }


def _per_rank_scenarios(rank: int, world: int) -> dict[str, dict]:
    """The reference's per-rank schemes (each rank resolves its own ``A_k``, outputs reduced)."""
    return {
        "avg": _conductor_two_cycles(rank, world),  # averaged A_k: the skip is shared too
        # float32 accumulation: the reference's bfloat16 would round the reduced output
        "reference_avg": _conductor_two_cycles(
            rank, world, reference=True, accumulation_dtype=torch.float32
        ),
        "broadcast_sum": _conductor_two_cycles(rank, world, ddp_sync="broadcast"),
    }


def _scenarios(rank: int, world: int, distributed: bool) -> dict[str, dict]:
    reduce = make_reducer() if distributed else None
    return {
        # per-task rows averaged (active mode, PCGrad inside the group)
        "fn_active_pcgrad": _songoku_functional(
            rank, world, reduce, aggregator=aggregators.aggregator("pcgrad", reduction="mean")
        ),
        # one-backward steps + a probe step with a sketch (sketches and sum averaged)
        "fn_refresh_sketch": _songoku_functional(
            rank, world, reduce, ema_mode="refresh", sketch_dim=16
        ),
        "adapter_ddp": _songoku_adapter(rank, world, wrap=distributed),
        "adapter_plain_refresh": _songoku_adapter(rank, world, wrap=False, ema_mode="refresh"),
        # GCond: accumulated A_k and losses averaged before the resolution
        "gcond_fn_classic": _conductor_functional(rank, world, reduce, stochastic=False),
        "gcond_fn_stochastic_lion": _conductor_functional(rank, world, reduce, use_lion=True),
        "gcond_adapter_ddp": _conductor_adapter(rank, world, wrap=distributed),
        "gcond_adapter_plain_classic": _conductor_adapter(
            rank, world, wrap=False, stochastic_accumulation=False
        ),
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        out = {"union": _scenarios(rank, 2, True), "per_rank": _per_rank_scenarios(rank, 2)}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process_on_the_union():
    ranks = run_two_ranks(_worker, weights_only=False)
    per_rank = [r["per_rank"] for r in ranks]
    ranks = [r["union"] for r in ranks]
    oracle = _scenarios(0, 1, False)
    local = _scenarios(0, 2, False)  # rank 0 alone on its slice: the sync must matter
    for name, expected in oracle.items():
        assert_trees_equal(ranks[0][name], ranks[1][name])
        # GCond resolves in float32 (its output is float32 whatever the parameters' dtype)
        f64_tol = 1e-6 if name.startswith("gcond") else 1e-9
        assert_trees_close(ranks[0][name], expected, 1e-5, f64_tol=f64_tol)
        diff = ranks[0][name]["params"]["trunk.0.weight"] - local[name]["params"]["trunk.0.weight"]
        assert diff.abs().max() > 1e-6, name
    # the conflicting pair was split: some step ran fewer than K tasks
    assert (oracle["fn_active_pcgrad"]["active"].sum(dim=1) < K).any()
    assert int(oracle["adapter_ddp"]["state"]["refreshes"]) == STEPS // 2
    # GCond resolved real conflicts (the projection ran) in the classic scenario
    assert float(oracle["gcond_fn_classic"]["state"]["inner"].inner[0].min_cosine_sim) < 0
    _check_per_rank(per_rank)


def _check_per_rank(ranks: list[dict]) -> None:
    """Per-rank schemes against each rank's own run without a process group (same data)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ddp_sync="broadcast" warns
        alone = [_per_rank_scenarios(r, 2) for r in range(2)]
    for name, reduce in (("reference_avg", 0.5), ("broadcast_sum", 1.0)):
        for r in range(2):
            got = ranks[r][name]
            for n, g in got["grads"].items():
                want = reduce * (alone[0][name]["grads"][n] + alone[1][name]["grads"][n])
                torch.testing.assert_close(g, want, rtol=1e-6, atol=1e-9, msg=f"{name} {n}")
    for name in ("avg", "reference_avg", "broadcast_sum"):
        for r in range(2):
            # the last rank's cycle is non-finite: every rank skips it and writes no gradient
            assert bool(ranks[r][name]["skipped"]) and bool(ranks[r][name]["grad_none"]), name
            assert int(ranks[r][name]["num_skipped"]) == 1, name
        assert not bool(alone[0][name]["skipped"]) and bool(alone[1][name]["skipped"])
    # averaged decisions: different from the per-rank resolution's averaged output
    diff = (
        ranks[0]["avg"]["grads"]["trunk.0.weight"]
        - ranks[0]["reference_avg"]["grads"]["trunk.0.weight"]
    )
    assert diff.abs().max() > 1e-6
