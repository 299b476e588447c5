"""``SonGokuScheduler(rows="streaming")``: the sketched step without the ``K × n`` per-task rows.

Oracle: the row path with the same sketch seed (``rows="rows"``), which differentiates every
task, sketches its rows and sums the group's rows; the streaming run is made unable to compute a
per-task row at all.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradfn.algorithms._songoku._step as step_module
import gradfn.weighting as W
from gradfn import SonGokuScheduler, TaskSpec, TauSchedule, songoku
from gradfn.algorithms._songoku import group_lists

K = 4
SIGNS = (1.0, 0.5, -1.0, -0.7)  # two pairs of opposed tasks: the graph splits them


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(K))

    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return self.heads[k](self.trunk(x)).squeeze(-1)


def _spec(k: int, provider: bool = False) -> TaskSpec:
    def loss(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return ((m(x, k) - SIGNS[k] * y) ** 2).mean()

    g = torch.Generator().manual_seed(50 + k)

    def fresh() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(8, 6, generator=g, dtype=torch.float64)
        return x, x.sum(dim=1)

    return TaskSpec(f"t{k}", loss, refresh_batch_provider=fresh if provider else None)


def _batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(8, 6, generator=g, dtype=torch.float64)
        out.append({f"t{k}": (x, x.sum(dim=1)) for k in range(K)})
    return out


def _run(rows: str, n: int, providers: bool = False, **options):
    model = Net().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    sched = SonGokuScheduler(
        model,
        [_spec(k, providers) for k in range(K)],
        opt,
        refresh_period=3,
        tau_schedule=TauSchedule("constant", tau_target=0.0),
        sketch_dim=64,
        seed=3,
        rows=rows,
        **options,
    )
    trace = []
    for batch in _batches(n):
        sched.step(batch)
        trace.append((sched.schedule_snapshot(), sched.state.adjacency.clone()))
    return model, sched, trace


def _no_rows(*args, **kwargs):
    raise AssertionError("the streaming path computed per-task rows")


@pytest.mark.parametrize(
    ("providers", "options"),
    [
        (False, {}),
        (False, {"reduction": "mean", "min_updates_per_cycle": 2}),
        (False, {"loss_weighting": W.dwa()}),
        (True, {"ema_mode": "refresh"}),
    ],
    ids=["sum", "mean-coverage", "dwa", "refresh-providers"],
)
def test_streaming_matches_the_row_path(monkeypatch, providers, options):
    n = 13
    model_r, sched_r, trace_r = _run("rows", n, providers, **options)
    monkeypatch.setattr(step_module, "value_and_per_task_grads", _no_rows)
    model_s, sched_s, trace_s = _run("streaming", n, providers, **options)
    assert sched_r.rows == "rows" and sched_s.rows == "streaming"
    # the graph split the tasks and some step left a task out (the check covers inactive tasks)
    assert any(len(groups) > 1 for groups, _ in trace_r)
    for (groups_r, adj_r), (groups_s, adj_s) in zip(trace_r, trace_s, strict=True):
        assert groups_s == groups_r
        assert torch.equal(adj_s, adj_r)
    for p_r, p_s in zip(model_r.parameters(), model_s.parameters(), strict=True):
        torch.testing.assert_close(p_s, p_r, rtol=0, atol=1e-10)
    # the sketched EMA (float32) agrees up to the summation order of the sketch
    torch.testing.assert_close(sched_s.state.ema, sched_r.state.ema, rtol=1e-5, atol=1e-6)
    assert torch.equal(sched_s.state.ema_count, sched_r.state.ema_count)


def test_backward_mode_writes_the_same_grads(monkeypatch):
    model_r, model_s = Net().double(), Net().double()
    kw = {"sketch_dim": 32, "tau_schedule": TauSchedule("constant", tau_target=0.0)}
    sched_r = SonGokuScheduler(model_r, [_spec(k) for k in range(K)], rows="rows", **kw)
    sched_s = SonGokuScheduler(model_s, [_spec(k) for k in range(K)], rows="streaming", **kw)
    monkeypatch.setattr(step_module, "value_and_per_task_grads", _no_rows)
    for batch in _batches(2):
        monkeypatch.undo()
        out_r = sched_r.backward(batch)
        monkeypatch.setattr(step_module, "value_and_per_task_grads", _no_rows)
        out_s = sched_s.backward(batch)
        assert out_s["active"] == out_r["active"]
        for p_r, p_s in zip(model_r.parameters(), model_s.parameters(), strict=True):
            assert (p_s.grad is None) == (p_r.grad is None)
            if p_r.grad is not None:
                torch.testing.assert_close(p_s.grad, p_r.grad, rtol=0, atol=1e-12)
        model_r.zero_grad(set_to_none=True)
        model_s.zero_grad(set_to_none=True)


def _sched(**kw) -> SonGokuScheduler:
    return SonGokuScheduler(Net(), [_spec(k) for k in range(K)], **kw)


def test_auto_keeps_the_rows_on_the_cpu_and_streams_over_a_budget():
    assert _sched(sketch_dim=16).rows == "rows"  # the CPU: no budget, the rows are used
    need = K * sum(p.numel() * p.element_size() for p in Net().parameters())
    assert _sched(sketch_dim=16, memory_budget=need).rows == "rows"  # they fit exactly
    with pytest.warns(UserWarning, match="rows='streaming'"):
        assert _sched(sketch_dim=16, memory_budget=need - 1).rows == "streaming"
    # streaming needs a sketched EMA and no in-group aggregator: auto keeps the rows then
    assert _sched(memory_budget=1).rows == "rows"
    assert _sched(sketch_dim=16, memory_budget=1, base_method="pcgrad").rows == "rows"


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"rows": "streaming"}, r"rows='streaming' needs sketch_dim"),
        ({"rows": "stream", "sketch_dim": 8}, r"`rows` must be one of"),
        ({"rows": "auto", "memory_budget": 0}, r"`memory_budget` must be a positive int"),
        ({"memory_budget": True, "sketch_dim": 8}, r"`memory_budget` must be a positive int"),
        ({"rows": "streaming", "sketch_dim": 8, "base_method": "pcgrad"}, r"aggregator"),
        ({"rows": "streaming", "sketch_dim": 8, "strategy": "loop"}, r"'loop'"),
    ],
)
def test_bad_options_raise_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        _sched(**kw)


def test_functional_songoku_checks_rows():
    loss_fn = lambda p, b: [(p["w"] * b).sum(), (p["w"] ** 2).sum()]
    with pytest.raises(ValueError, match="sketch_dim"):
        songoku(loss_fn, num_tasks=2, rows="streaming")
    with pytest.raises(ValueError, match="`rows` must be one of"):
        songoku(loss_fn, num_tasks=2, rows="auto")


@pytest.mark.parametrize("weighting", [None, "dwa"])
def test_functional_streaming_with_a_reducer_matches_the_rows(weighting):
    # the reducer is called on what each path averages across ranks (identity: one rank)
    calls = {"rows": 0, "streaming": 0}
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(5, 4, generator=g, dtype=torch.float64)}
    params["h"] = torch.randn(3, 4, generator=g, dtype=torch.float64)
    signs = torch.tensor([1.0, -0.8, 0.6], dtype=torch.float64)

    def loss_fn(p, x):
        z = torch.tanh(x @ p["w"])
        return [((z * p["h"][k]).sum(1) - signs[k] * x.sum(1)).pow(2).mean() for k in range(3)]

    def run(rows):
        def reduce(tree):
            calls[rows] += 1
            return tree

        extra = {} if weighting is None else {"loss_weighting": W.weighting(weighting)}
        algo = songoku(
            loss_fn, num_tasks=3, shared=["w"], refresh_period=2, tau_schedule=-0.5,
            sketch_dim=16, reduce=reduce, rows=rows, **extra,
        )  # fmt: skip
        p = {n: v.clone() for n, v in params.items()}
        state, trace = algo.init(p), []
        for x in torch.randn(7, 6, 5, generator=torch.Generator().manual_seed(2)).double():
            state, grads = algo.update(state, p, x)
            p = {n: v - 0.1 * grads[n] for n, v in p.items()}
            trace.append(group_lists(state))
        return p, state, trace

    p_r, s_r, t_r = run("rows")
    p_s, s_s, t_s = run("streaming")
    assert t_s == t_r and any(len(groups) > 1 for groups in t_r)
    for n in params:
        torch.testing.assert_close(p_s[n], p_r[n], rtol=0, atol=1e-10)
    torch.testing.assert_close(s_s.ema, s_r.ema, rtol=1e-5, atol=1e-6)
    assert calls["rows"] > 0 and calls["streaming"] > 0
