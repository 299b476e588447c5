"""SON-GOKU and GradientConductor on FSDP2 ``fully_shard`` models, two real processes (gloo).

The oracle is one process running gradfn's single-process algorithm (``songoku`` /
``conductor``) on the union of the two ranks' batches. Each rank must take the oracle's decisions
(groups, interference, GCond's statistics and winners) and produce its gradients; the control
(``all_reduce=False``: each rank decides from its own shards) must miss them.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call

from gradfn.algorithms import ConductorConfig, SonGokuConfig, conductor, songoku
from gradfn.integrations.fsdp import conductor_backward, songoku_backward
from tests._utils.two_ranks import run_two_ranks

K, BATCH, STEPS, LR = 3, 8, 4, 0.1
SONGOKU = {
    "sum": SonGokuConfig(num_tasks=K, refresh_period=2, ema_beta=0.5),
    "upgrad": SonGokuConfig(
        num_tasks=K, refresh_period=2, ema_mode="refresh", aggregator="upgrad", reduction="mean"
    ),
}
CONDUCTOR = {
    "classic": ConductorConfig(
        lambdas=(1.0, 0.5, 2.0),
        accumulation_steps=2,
        stochastic=False,
        accumulation_dtype=torch.float64,
    ),
    "lion": ConductorConfig(
        lambdas=(1.0, 0.5, 2.0),
        accumulation_steps=3,
        use_lion=True,
        norm_cap=1.0,
        accumulation_dtype=torch.float64,
    ),
}
CYCLES = 2
CONTROL_STEPS = 2  # SON-GOKU's first refresh is at step 2 (refresh_period=2)
CONTROLS = ("songoku-upgrad", "conductor-lion")  # one per algorithm (each run costs backwards)


def _model() -> nn.Sequential:
    torch.manual_seed(0)  # Linear(16, 2): 2 rows, 1 per rank; Linear(5, 16): 8 rows each
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2)).double()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return (
        torch.randn(BATCH, 5, generator=g, dtype=torch.float64),
        torch.randn(BATCH, generator=g, dtype=torch.float64),
    )


def _half(batch: tuple[torch.Tensor, torch.Tensor], rank: int) -> tuple[torch.Tensor, ...]:
    part = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    return tuple(t[part] for t in batch)


def _losses(out: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Tasks 0 and 1 pull output 0 to opposite targets (they conflict); task 2 mostly output 1."""
    return [
        (out[:, 0] - 1 - 0.3 * y).pow(2).mean(),
        (out[:, 0] + 1 - 0.3 * y).pow(2).mean(),
        (out[:, 1] - y).pow(2).mean() + 0.2 * (out[:, 0] - 0.5).pow(2).mean(),
    ]


def _record_songoku(state: Any) -> dict[str, torch.Tensor]:
    keys = ("groups", "num_groups", "rho", "adjacency", "active", "losses", "skipped", "step")
    return {key: getattr(state, key).clone() for key in keys}


def _record_conductor(state: Any) -> dict[str, torch.Tensor]:
    out = {f: getattr(state.stats, f).clone() for f in state.stats._fields}
    for key in ("winners", "history", "proj_iters", "min_cosine_sim", "norm_ema", "skipped"):
        out[key] = getattr(state, key).clone()
    return out


def _full(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: g.full_tensor().clone() for n, g in grads.items()}


def _sharded(mesh: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _model()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


class _Kink(nn.Module):
    """Adds ``Σ sqrt(|w|)`` with ``w = (0, 1, 1, 1)``: finite, but the gradient of ``w_0`` is
    NaN, and only rank 0's shard holds it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[0.0], [1.0], [1.0], [1.0]], dtype=torch.float64))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.w.abs().sqrt().sum()


class _Spare(nn.Module):
    """The test model plus a head that no task uses (like an inactive task's head)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _model()
        self.spare = nn.Linear(16, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _spare_step(model: nn.Module, rank: int) -> dict[str, Any]:
    x, y = _half(_batch(0), rank)
    _, grads = songoku_backward(_losses(model(x), y), model, SONGOKU["sum"])
    return {
        "names": sorted(grads),
        "spare": [p.grad is None for p in model.spare.parameters()],
        "body": [p.grad is not None for p in model.body.parameters()],
    }


def _poisoned(mesh: Any) -> dict[str, bool]:
    """One step of each algorithm where one rank's shard of a gradient is non-finite."""
    from torch.distributed.fsdp import fully_shard

    out = {}
    for name in ("songoku", "conductor"):
        model = nn.Sequential(*_model(), _Kink())
        fully_shard(model, mesh=mesh)
        x, y = _half(_batch(0), dist.get_rank())
        if name == "songoku":
            state, _ = songoku_backward(_losses(model(x), y), model, SONGOKU["sum"])
        else:
            config = CONDUCTOR["lion"]
            micro = (_losses(model(x), y) for _ in range(config.accumulation_steps))
            state, _ = conductor_backward(micro, model, config)
        out[name] = bool(state.skipped)
    return out


def _sgd(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
            p.grad = None


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # a bug that makes the ranks decide differently makes them differentiate different tasks:
    # FSDP's collectives then mismatch, and the timeout turns a hang into a failure
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2,))
        result: dict[str, Any] = {}
        for name, config in SONGOKU.items():
            for reduce in (True, False) if f"songoku-{name}" in CONTROLS else (True,):
                model, state, trace = _sharded(mesh), None, []
                # the control stops at the first refresh: after it, the ranks' groups differ, so
                # they would differentiate different tasks and FSDP's collectives would mismatch
                for step in range(STEPS if reduce else CONTROL_STEPS):
                    x, y = _half(_batch(step), rank)
                    state, grads = songoku_backward(
                        _losses(model(x), y), model, config, state, all_reduce=reduce
                    )
                    trace.append((_record_songoku(state), _full(grads)))
                    _sgd(model)
                result[f"songoku-{name}-{reduce}"] = trace
        for name, config in CONDUCTOR.items():
            for reduce in (True, False) if f"conductor-{name}" in CONTROLS else (True,):
                model, state, trace = _sharded(mesh), None, []
                for cycle in range(CYCLES):
                    n = config.accumulation_steps
                    micro = [_half(_batch(cycle * n + i), rank) for i in range(n)]
                    state, grads = conductor_backward(
                        (_losses(model(x), y) for x, y in micro),
                        model,
                        config,
                        state,
                        all_reduce=reduce,
                    )
                    trace.append((_record_conductor(state), _full(grads)))
                    _sgd(model)
                result[f"conductor-{name}-{reduce}"] = trace
        result["poisoned"] = _poisoned(mesh)
        from torch.distributed.fsdp import fully_shard

        spare = _Spare()
        fully_shard(spare, mesh=mesh)
        result["spare"] = _spare_step(spare, rank)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _loss_fn(params: dict[str, torch.Tensor], batch: tuple[torch.Tensor, ...]) -> list[Any]:
    return _losses(functional_call(_model(), params, (batch[0],)), batch[1])


def _oracle_songoku(config: SonGokuConfig) -> list[tuple[dict, dict]]:
    params = {n: p.detach().clone() for n, p in _model().named_parameters()}
    algo = songoku(_loss_fn, config)
    state, trace = algo.init(params), []
    for step in range(STEPS):
        state, grads = algo.update(state, params, _batch(step))
        trace.append((_record_songoku(state), {n: g.clone() for n, g in grads.items()}))
        params = {n: p - LR * grads[n] for n, p in params.items()}
    return trace


def _oracle_conductor(config: ConductorConfig) -> list[tuple[dict, dict]]:
    params = {n: p.detach().clone() for n, p in _model().named_parameters()}
    algo = conductor(_loss_fn, config=config)
    state, trace = algo.init(params), []
    n = config.accumulation_steps
    for cycle in range(CYCLES):
        state, grads = algo.update(state, params, [_batch(cycle * n + i) for i in range(n)])
        trace.append((_record_conductor(state), {k: g.clone() for k, g in grads.items()}))
        params = {k: p - LR * grads[k] for k, p in params.items()}
    return trace


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_two_ranks(_worker)


def _same(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool, f32: bool = False
) -> None:
    """Equal (``exact``: bitwise), in float64 or (float32 tensors, ``f32``) float32 precision."""
    for key in b:
        if exact or a[key].dtype in (torch.bool, torch.int64):
            assert torch.equal(a[key], b[key]), key
        else:
            tol = 1e-9 if a[key].dtype == torch.float64 and not f32 else 1e-5
            torch.testing.assert_close(
                a[key], b[key], rtol=tol, atol=tol / 10, msg=lambda m, key=key: f"{key}: {m}"
            )


@pytest.mark.parametrize("name", list(SONGOKU))
def test_songoku_ranks_decide_alike_and_equal_one_process(ranks, name):
    oracle = _oracle_songoku(SONGOKU[name])
    # not trivial: the conflict splits the tasks into groups, and both groups run
    assert max(int(rec["num_groups"]) for rec, _ in oracle) > 1
    assert {tuple(rec["active"].tolist()) for rec, _ in oracle} >= {(1, 0, 1), (0, 1, 0)}
    mine, other = ranks[0][f"songoku-{name}-True"], ranks[1][f"songoku-{name}-True"]
    for (rec, grads), (rec1, grads1), (want, want_grads) in zip(mine, other, oracle, strict=True):
        _same(rec, rec1, exact=True)  # both ranks: bit-identical decisions
        _same(rec, want, exact=False)
        _same(grads, grads1, exact=True)
        _same(grads, want_grads, exact=False)


@pytest.mark.parametrize("name", list(CONDUCTOR))
def test_conductor_ranks_decide_alike_and_equal_one_process(ranks, name):
    oracle = _oracle_conductor(CONDUCTOR[name])
    assert any(int(rec["proj_iters"]) > 0 for rec, _ in oracle)  # conflicts were resolved
    assert any(bool((rec["winners"] >= 0).any()) for rec, _ in oracle)  # and arbitrated
    mine, other = ranks[0][f"conductor-{name}-True"], ranks[1][f"conductor-{name}-True"]
    for (rec, grads), (rec1, grads1), (want, want_grads) in zip(mine, other, oracle, strict=True):
        _same(rec, rec1, exact=True)
        _same(rec, want, exact=False)
        _same(grads, grads1, exact=True)
        _same(grads, want_grads, exact=False, f32=True)  # GCond resolves in float32


@pytest.mark.parametrize("key", CONTROLS)
def test_control_without_the_all_reduce_fails(ranks, key):
    algorithm, name = key.split("-")
    if algorithm == "songoku":
        oracle, stat = _oracle_songoku(SONGOKU[name]), "rho"
    else:
        oracle, stat = _oracle_conductor(CONDUCTOR[name]), "raw_norms"
    last = [r[f"{key}-False"][-1][0][stat] for r in ranks]
    assert not torch.allclose(last[0], last[1], atol=1e-3)  # each rank decides on its own
    for trace in (r[f"{key}-False"] for r in ranks):
        rec, grads = trace[-1]
        want, want_grads = oracle[len(trace) - 1]
        assert not torch.allclose(rec[stat], want[stat], atol=1e-3)
        assert any(not torch.allclose(grads[n], want_grads[n], atol=1e-4) for n in grads)


def test_a_parameter_no_active_task_reaches_keeps_no_gradient(ranks):
    # as in the paper: an untouched head gets no p.grad, so a momentum optimizer leaves it
    for out in [r["spare"] for r in ranks] + [_spare_step(_Spare(), 0)]:  # sharded, plain
        assert out["spare"] == [True, True] and all(out["body"])
        assert out["names"] == sorted(n for n, _ in _Spare().body.named_parameters(prefix="body"))


def test_a_non_finite_shard_on_one_rank_skips_the_step_on_every_rank(ranks):
    for r in ranks:
        assert r["poisoned"] == {"songoku": True, "conductor": True}


def test_without_process_group_equals_the_single_process_algorithms():
    for config, donate in zip(SONGOKU.values(), (True, False), strict=True):
        model, state = _model(), None
        for step, (want, want_grads) in enumerate(_oracle_songoku(config)):
            x, y = _batch(step)
            state, grads = songoku_backward(
                _losses(model(x), y), model, config, state, donate_state=donate
            )
            _same(_record_songoku(state), want, exact=False)
            _same({n: g.clone() for n, g in grads.items()}, want_grads, exact=False)
            _sgd(model)
    config = CONDUCTOR["lion"]
    model, state, n = _model(), None, config.accumulation_steps
    for cycle, (want, want_grads) in enumerate(_oracle_conductor(config)):
        micro = [_batch(cycle * n + i) for i in range(n)]
        state, grads = conductor_backward(
            (_losses(model(x), y) for x, y in micro), model, config, state
        )
        _same(_record_conductor(state), want, exact=False)
        _same({k: g.clone() for k, g in grads.items()}, want_grads, exact=False, f32=True)
        _sgd(model)


def test_bad_input():
    model = _model()
    x, y = _batch(0)
    with pytest.raises(ValueError, match="`losses` holds 2 losses"):
        songoku_backward(_losses(model(x), y)[:2], model, SONGOKU["sum"])
    with pytest.raises(ValueError, match="`sketch_dim`"):
        songoku_backward(_losses(model(x), y), model, num_tasks=K, sketch_dim=4)
    with pytest.raises(ValueError, match="needs the full per-task rows"):
        songoku_backward(_losses(model(x), y), model, num_tasks=K, aggregator="graddrop")
    with pytest.raises(TypeError, match="`config`"):
        songoku_backward(_losses(model(x), y), model, CONDUCTOR["lion"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`state` must be a SonGokuState"):
        songoku_backward(_losses(model(x), y), model, SONGOKU["sum"], state=())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`donate_state`"):
        songoku_backward(_losses(model(x), y), model, SONGOKU["sum"], donate_state=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`all_reduce`"):
        songoku_backward(_losses(model(x), y), model, SONGOKU["sum"], all_reduce=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`model`"):
        songoku_backward(_losses(model(x), y), [torch.zeros(2)], SONGOKU["sum"])  # type: ignore[arg-type]
    config = CONDUCTOR["classic"]
    with pytest.raises(ValueError, match="bfloat16"):
        conductor_backward(
            [], model, lambdas=(1.0,), accumulation_steps=1, accumulation_dtype=torch.bfloat16
        )
    with pytest.raises(ValueError, match="holds 1 items but accumulation_steps=2"):
        conductor_backward([_losses(model(x), y)], model, config)
    with pytest.raises(ValueError, match="ended after 1 of N=2"):
        conductor_backward(iter([_losses(model(x), y)]), model, config)
    with pytest.raises(ValueError, match="gives 2 losses"):
        conductor_backward([_losses(model(x), y)[:2]] * 2, model, config)
    with pytest.raises(TypeError, match="`microbatch_losses`"):
        conductor_backward(3, model, config)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`state` must be a ConductorState"):
        conductor_backward([_losses(model(x), y)] * 2, model, config, state=())  # type: ignore[arg-type]
    assert all(p.grad is None for p in model.parameters())  # nothing was written
