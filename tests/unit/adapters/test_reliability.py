"""The adapters on a user's bad day: partially labelled batches, NaN batches, failing refreshes,
foreign checkpoints, a task that is always NaN (docs: Reliability)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradfn.adapters import GradientConductor, SonGokuScheduler, TaskSpec
from gradfn.schedules import TauSchedule
from tests._utils.models import TrunkHeads

X = torch.randn(16, 4, generator=torch.Generator().manual_seed(3))
Y = torch.randn(16, generator=torch.Generator().manual_seed(4))


def labelled_loss(k: int):
    """Task ``k``'s MSE on head ``k``; a constant 0 when its batch has no labels (``None``)."""

    def loss_fn(model: nn.Module, batch: tuple) -> torch.Tensor:
        x, y = batch
        if y is None:
            return torch.zeros(())
        return nn.functional.mse_loss(model(x, k), y)

    return loss_fn


def trunk_filter(model: TrunkHeads):
    return lambda p: any(p is q for q in model.trunk.parameters())


# --- defect: parameters frozen from the first batch -----------------------------------------


def test_songoku_a_head_the_first_batch_does_not_reach_trains_later():
    model = TrunkHeads(4, 8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tasks = [TaskSpec(f"t{k}", labelled_loss(k)) for k in range(3)]
    sched = SonGokuScheduler(model, tasks, opt, refresh_period=4)
    before = model.heads[2].weight.detach().clone()
    sched.step({"t0": (X, Y), "t1": (X, Y), "t2": (X, None)})  # no labels for t2 yet
    assert torch.equal(model.heads[2].weight, before)
    for _ in range(3):
        sched.step({"t0": (X, Y), "t1": (X, Y), "t2": (X, Y)})
    assert not torch.equal(model.heads[2].weight, before)
    assert sched.debug_state()["head_params"]["t2"] == ["heads.2.weight", "heads.2.bias"]


def test_songoku_a_constant_first_loss_with_two_tasks_names_the_task():
    model = TrunkHeads(4, 8, 2)
    tasks = [TaskSpec(f"t{k}", labelled_loss(k)) for k in range(2)]
    sched = SonGokuScheduler(model, tasks, torch.optim.SGD(model.parameters(), lr=0.1))
    try:
        sched.step({"t0": (X, Y), "t1": (X, None)})
    except ValueError as err:
        assert "['t1'] reached no parameter" in str(err) and "shared_param_filter" in str(err)
    else:
        raise AssertionError("expected a ValueError")


def column_loss(k: int):
    """Every head in one forward, the loss reads column ``k``: every head is in every graph."""

    def loss_fn(model: nn.Module, batch: tuple) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(model(x)[:, k], y)

    return loss_fn


def test_songoku_declared_heads_of_inactive_tasks_get_none_even_when_reached():
    model = TrunkHeads(4, 8, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    heads = [set(map(id, model.heads[k].parameters())) for k in range(3)]
    tasks = [
        TaskSpec(f"t{k}", column_loss(k), head_param_filter=lambda p, k=k: id(p) in heads[k])
        for k in range(3)
    ]
    sched = SonGokuScheduler(
        model,
        tasks,
        opt,
        shared_param_filter=trunk_filter(model),
        refresh_period=1,
        tau_schedule=TauSchedule("constant", tau_target=-1.0),  # every task alone
    )
    batch = {f"t{k}": (X, Y) for k in range(3)}
    sched.step(batch)  # every task: Adam has moments for every head
    for _ in range(3):
        before = [model.heads[k].weight.detach().clone() for k in range(3)]
        active = {int(n[1:]) for n in sched.step(batch)}
        for k in range(3):
            moved = not torch.equal(model.heads[k].weight, before[k])
            assert moved == (k in active), (k, active)
            assert (model.heads[k].weight.grad is None) == (k not in active)


class ListHeads(TrunkHeads):
    """``model(x)`` is the list of the heads' ``(B,)`` outputs: a loss reads only its own."""

    def forward(self, x: torch.Tensor, k: int | None = None) -> list[torch.Tensor]:  # type: ignore[override]
        return [y.squeeze(-1) for y in self.head_outputs(x)]


def test_gcond_a_head_first_reached_in_a_later_cycle_trains():
    model = ListHeads(4, 8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss(k: int):
        def fn(out: list[torch.Tensor], y: tuple) -> torch.Tensor:
            target, has = y
            return nn.functional.mse_loss(out[k], target) if has[k] else torch.zeros(())

        return fn

    gc = GradientConductor(
        model, {"a": loss(0), "b": loss(1)}, {"a": 1.0, "b": 1.0}, 2, stochastic_accumulation=False
    )
    before = model.heads[1].weight.detach().clone()
    for labels in [(True, False), (True, True), (True, True)]:
        opt.zero_grad()
        gc.step(lambda labels=labels: (X, (Y, labels)))
        if labels[1]:
            assert model.heads[1].weight.grad is not None
        else:
            assert model.heads[1].weight.grad is None
        opt.step()
    assert not torch.equal(model.heads[1].weight, before)


# --- defect: a step whose refresh raises was half applied -------------------------------------


def songoku_run(provider, **kw):
    model = TrunkHeads(4, 8, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    tasks = [
        TaskSpec(f"t{k}", labelled_loss(k), refresh_batch_provider=provider if k == 0 else None)
        for k in range(3)
    ]
    tau = TauSchedule("constant", tau_target=-0.5)
    return model, opt, SonGokuScheduler(model, tasks, opt, refresh_period=2, tau_schedule=tau, **kw)


def test_songoku_a_refresh_that_raises_applies_nothing_and_a_retry_is_one_step():
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 2:  # the second refresh fails once
            raise OSError("data source unavailable")
        return (X, Y)

    model_a, opt_a, a = songoku_run(flaky)
    model_b, opt_b, b = songoku_run(lambda: (X, Y))
    batch = {f"t{k}": (X * (1 + k), Y) for k in range(3)}
    for t in range(6):
        b.step(batch)
        try:
            a.step(batch)
        except OSError:
            assert t == 3 and a.t == 3
            a.step(batch)  # the retry
    assert a.t == b.t == 6 and a.schedule_snapshot() == b.schedule_snapshot()
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)
        assert torch.equal(opt_a.state[pa]["exp_avg"], opt_b.state[pb]["exp_avg"])
        assert int(opt_a.state[pa]["step"]) == int(opt_b.state[pb]["step"])


def test_songoku_backward_keeps_a_deferred_refresh_whose_provider_raises():
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("data source unavailable")
        return (X, Y)

    model_a, opt_a, a = songoku_run(flaky)
    model_b, opt_b, b = songoku_run(lambda: (X, Y))
    batch = {f"t{k}": (X * (1 + k), Y) for k in range(3)}
    for t in range(5):
        for sched, opt in ((a, opt_a), (b, opt_b)):
            try:
                sched.backward(batch)
            except OSError:  # the refresh deferred from step 2 fails at the start of step 3
                assert t == 2 and sched is a
                sched.backward(batch)
            opt.step()
    assert a.schedule_snapshot() == b.schedule_snapshot()
    assert all(
        torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True)
    )


def test_songoku_an_unwritable_graph_dump_applies_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    model, opt, sched = songoku_run(None, dump_graph_dir=str(blocker / "graphs"))
    batch = {f"t{k}": (X, Y) for k in range(3)}
    sched.step(batch)
    before = [p.detach().clone() for p in model.parameters()]
    state = sched.state_dict()
    try:
        sched.step(batch)  # refresh due: the dump fails
    except OSError:
        pass
    else:
        raise AssertionError("expected an OSError")
    assert sched.t == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert all(int(s["step"]) == 1 for s in opt.state.values())
    after = sched.state_dict()
    assert torch.equal(
        after["core"]["ema"]["trunk.0.weight"], state["core"]["ema"]["trunk.0.weight"]
    )


# --- defect: a skipped step still moved BatchNorm's running statistics -----------------------


def buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for b in model.buffers()]


def assert_eval_finite_and_buffers_kept(model: nn.Module, before: list[torch.Tensor]) -> None:
    assert all(torch.equal(b, a) for b, a in zip(model.buffers(), before, strict=True))
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(X)).all()


def test_songoku_a_skipped_step_leaves_batchnorm_statistics():
    model = TrunkHeads(4, 8, 3, batchnorm=True)
    tasks = [TaskSpec(f"t{k}", labelled_loss(k)) for k in range(3)]
    sched = SonGokuScheduler(model, tasks, torch.optim.SGD(model.parameters(), lr=0.1))
    sched.step({f"t{k}": (X, Y) for k in range(3)})
    before = buffers(model)
    bad = X.clone()
    bad[0, 0] = float("nan")
    assert sched.backward({f"t{k}": (bad, Y) for k in range(3)})["skipped"]
    assert_eval_finite_and_buffers_kept(model, before)


def test_gcond_a_skipped_cycle_leaves_batchnorm_statistics():
    model = TrunkHeads(4, 8, 2, batchnorm=True)
    mse = nn.functional.mse_loss
    gc = GradientConductor(
        model,
        {"a": lambda out, y: mse(out[:, 0], y), "b": lambda out, y: mse(out[:, 1], y)},
        {"a": 1.0, "b": 1.0},
        2,
    )
    gc.step(lambda: (X, Y))
    before = buffers(model)
    bad = X.clone()
    bad[0, 0] = float("nan")
    assert gc.step(lambda: (bad, Y))["skipped"]
    assert_eval_finite_and_buffers_kept(model, before)


# --- defects: load_state_dict checked only the task names --------------------------------------


def raises(fn, *words: str) -> None:
    try:
        fn()
    except ValueError as err:
        assert all(w in str(err) for w in words), str(err)
    else:
        raise AssertionError(f"expected a ValueError mentioning {words}")


def trained_songoku(**kw):
    model = TrunkHeads(4, 8, 3, **kw)
    tasks = [TaskSpec(f"t{k}", labelled_loss(k)) for k in range(3)]
    sched = SonGokuScheduler(model, tasks, torch.optim.SGD(model.parameters(), lr=0.1))
    sched.step({f"t{k}": (X, Y) for k in range(3)})
    return model, sched


def test_songoku_load_rejects_a_checkpoint_of_another_model():
    _, sched = trained_songoku()
    _, other = trained_songoku(unused=True)  # two more trainable parameters
    raises(lambda: sched.load_state_dict(other.state_dict()), "usage", "another model")


def test_songoku_load_rejects_another_shared_set():
    model = TrunkHeads(4, 8, 3)
    tasks = [TaskSpec(f"t{k}", labelled_loss(k)) for k in range(3)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = SonGokuScheduler(model, tasks, opt, shared_param_filter=trunk_filter(model))
    _, other = trained_songoku()  # its shared set: the trunk found from the graph ...
    ckpt = other.state_dict()
    ckpt["shared_params"] = ckpt["shared_params"] + ["heads.0.bias"]  # ... and one more
    raises(lambda: sched.load_state_dict(ckpt), "shared parameters differ", "heads.0.bias")


def test_songoku_load_rejects_another_configuration():
    _, sched = trained_songoku()
    model = TrunkHeads(4, 8, 3)
    tasks = [TaskSpec(f"t{k}", labelled_loss(k)) for k in range(3)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    other = SonGokuScheduler(model, tasks, opt, ema_mode="refresh")
    raises(lambda: other.load_state_dict(sched.state_dict()), "ema_mode", "configuration")


def test_songoku_load_rejects_a_nan_ema_and_changes_nothing():
    _, sched = trained_songoku()
    good = sched.state_dict()
    bad = sched.state_dict()
    bad["core"]["ema"]["trunk.0.weight"][1, 0, 0] = float("nan")
    raises(lambda: sched.load_state_dict(bad), "ema", "NaN")
    after = sched.state_dict()
    assert torch.equal(
        after["core"]["ema"]["trunk.0.weight"], good["core"]["ema"]["trunk.0.weight"]
    )
    assert after["shared_params"] == good["shared_params"]


def conductor(model: nn.Module, **kw) -> GradientConductor:
    mse = nn.functional.mse_loss
    losses = {"a": lambda out, y: mse(out[:, 0], y), "b": lambda out, y: mse(out[:, 1], y)}
    return GradientConductor(model, losses, {"a": 1.0, "b": 1.0}, 2, **kw)


def test_gcond_load_rejects_a_nan_momentum_and_another_configuration():
    model = TrunkHeads(4, 8, 2)
    gc = conductor(model)
    gc.step(lambda: (X, Y))
    bad = gc.state_dict()
    bad["state"]["inner"]["inner"][1]["mu"]["trunk.0.weight"][0, 0] = float("nan")
    raises(lambda: gc.load_state_dict(bad), "NaN", "post/1/trunk.0.weight")
    classic = conductor(TrunkHeads(4, 8, 2), stochastic_accumulation=False)
    raises(lambda: classic.load_state_dict(gc.state_dict()), "stochastic", "configuration")


# --- defect: one always-NaN task stalled every task --------------------------------------------

NAN_Y = torch.full_like(Y, float("nan"))


def test_songoku_quarantine_lets_the_healthy_tasks_train():
    model = TrunkHeads(4, 8, 3)
    tasks = [TaskSpec(f"t{k}", labelled_loss(k)) for k in range(3)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = SonGokuScheduler(model, tasks, opt, refresh_period=2, quarantine_after=2)
    batch = {"t0": (X, Y), "t1": (X, Y), "t2": (X, NAN_Y)}
    with pytest.warns(RuntimeWarning, match="'t2' is quarantined"):
        for _ in range(2):
            assert sched.backward(batch)["skipped"]
    assert sched.quarantined == ["t2"] and sched.t == 0
    before = [model.heads[k].weight.detach().clone() for k in range(3)]
    for _ in range(4):
        sched.step(batch)
    assert sched.t == 4
    assert not torch.equal(model.heads[0].weight, before[0])
    assert not torch.equal(model.heads[1].weight, before[1])
    assert torch.equal(model.heads[2].weight, before[2]) and model.heads[2].weight.grad is None
    resumed = SonGokuScheduler(
        TrunkHeads(4, 8, 3), tasks, None, refresh_period=2, quarantine_after=2
    )
    resumed.load_state_dict(sched.state_dict())
    assert resumed.quarantined == ["t2"]
    sched.release("t2")
    assert sched.quarantined == []


def test_both_adapters_warn_when_every_step_is_skipped():
    model = TrunkHeads(4, 8, 3)
    tasks = [TaskSpec(f"t{k}", labelled_loss(k)) for k in range(3)]
    sched = SonGokuScheduler(model, tasks, torch.optim.SGD(model.parameters(), lr=0.1))
    batch = {"t0": (X, Y), "t1": (X, Y), "t2": (X, NAN_Y)}
    with pytest.warns(RuntimeWarning, match=r"10 consecutive steps were skipped .*t2"):
        for _ in range(10):
            sched.step(batch)
    mse = nn.functional.mse_loss
    gc = GradientConductor(
        TrunkHeads(4, 8, 2),
        {"a": lambda out, y: mse(out[:, 0], y[0]), "b": lambda out, y: mse(out[:, 1], y[1])},
        {"a": 1.0, "b": 1.0},
        2,
    )
    with pytest.warns(RuntimeWarning, match=r"10 consecutive cycles were skipped .*'b'"):
        for _ in range(10):
            gc.step(lambda: (X, (Y, NAN_Y)))
