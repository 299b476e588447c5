"""SonGokuScheduler (the nn.Module adapter) against a plain PyTorch loop (tests._utils.oracles)."""

import io
import math

import pytest
import torch

from gradfn.adapters import SonGokuScheduler, TaskSpec, TauSchedule
from tests._utils import oracles
from tests._utils.asserts import clone_tree, tree_equal
from tests._utils.models import TrunkHeads
from tests.unit.adapters._problems import abc_batches, abc_specs

K = 4


def Net(k=K, seed=0):
    """A float64 trunk ``Linear(3, 6) → tanh`` and ``k`` scalar heads; ``model(x, k)``."""
    return TrunkHeads(3, 6, k, dtype=torch.float64, seed=seed)


def task_loss(k):
    def loss_fn(model, batch):
        x, y = batch
        return ((model(x, k) - y) ** 2).mean()

    return loss_fn


def make_data(n_steps, k=K, seed=1):
    g = torch.Generator().manual_seed(seed)
    coef = torch.randn(k, 3, generator=g, dtype=torch.float64)
    out = []
    for _ in range(n_steps):
        step = {}
        for i in range(k):
            x = torch.randn(5, 3, generator=g, dtype=torch.float64)
            step[f"t{i}"] = (x, x @ coef[i])
        out.append(step)
    return out


def specs(k=K, **kw):
    return [TaskSpec(f"t{i}", task_loss(i), **kw) for i in range(k)]


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def optimizer_for(optim, model):
    if optim == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.05)
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def oracle_run(optim, data, r_period, tau, **kw):
    """``(model, history, classes)`` of the plain PyTorch loop (tests._utils.oracles)."""
    ref = Net()
    history, classes = oracles.plain_songoku_loop(
        ref,
        [task_loss(i) for i in range(K)],
        list(ref.trunk.parameters()),
        [list(h.parameters()) for h in ref.heads],
        optimizer_for(optim, ref),
        [[step[f"t{i}"] for i in range(K)] for step in data],
        refresh_period=r_period,
        tau=tau,
        beta=0.9,
        **kw,
    )
    return ref, history, classes


def trunk_scheduler(optim, r_period, tau, **kw):
    """``(model, scheduler)``: the adapter on a fresh model, its trunk shared."""
    model = Net()
    sched = SonGokuScheduler(
        model,
        specs(),
        optimizer_for(optim, model),
        shared_param_filter=lambda p: any(p is q for q in model.trunk.parameters()),
        refresh_period=r_period,
        tau_schedule=TauSchedule("constant", tau_target=tau),
        **kw,
    )
    return model, sched


@pytest.mark.parametrize("optim", ["adam", "sgd"])
def test_matches_a_plain_pytorch_loop_after_three_refresh_periods(optim):
    r_period, tau = 4, -0.3
    data = make_data(3 * r_period)
    ref, history, classes = oracle_run(optim, data, r_period, tau)
    assert max(len(h) for h in history) == K and min(len(h) for h in history) < K  # real groups

    model, sched = trunk_scheduler(optim, r_period, tau, ema_beta=0.9)
    seen = []
    for batch in data:
        seen.append(sorted(int(n[1:]) for n in sched.step(batch)))
    assert seen == history
    assert sched.schedule_snapshot() == [[f"t{i}" for i in c] for c in classes]
    got, want = params_of(model), params_of(ref)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("optim", ["adam", "sgd"])
def test_adatask_in_float64_matches_a_float64_loop(optim):
    # the norm EMA of the inverse-norm weighting stays in float64 for float64 gradients
    r_period, tau, steps = 4, -0.3, 63
    data = make_data(steps)
    ref, history, _ = oracle_run(optim, data, r_period, tau, inverse_norm=True)
    assert min(len(h) for h in history) < K and max(len(h) for h in history) > 1
    model, sched = trunk_scheduler(optim, r_period, tau, base_method="adatask")
    seen = [sorted(int(n[1:]) for n in sched.step(batch)) for batch in data]
    assert seen == history
    got, want = params_of(model), params_of(ref)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-13)
    assert sched.state is not None and sched.state.aggregator.norm_ema.dtype == torch.float64


def test_quick_start_runs_unchanged_apart_from_the_import():
    code = QUICK_START.replace("from son_goku import", "from gradfn import")
    scope: dict = {}
    exec(compile(code, "quickstart", "exec"), scope)
    sched = scope["sched"]
    assert sched.t == 100
    assert sched.schedule_snapshot() == [["task_a", "task_b"]]  # τ still warming up (τ0 = 1)
    assert set(scope["losses"]) == {"task_a", "task_b"}
    assert all(math.isfinite(v) for v in scope["losses"].values())
    state = sched.debug_state()
    for key in (
        "t",
        "tau",
        "classes",
        "schedule_len",
        "step_in_cycle",
        "refresh_period",
        "min_updates_per_cycle",
        "last_tau_value",
        "conflict_graph",
        "interference_matrix",
        "ema_norms",
    ):
        assert key in state
    assert state["head_params"]["task_b"] == ["head_b.weight", "head_b.bias"]


def test_debug_state_has_ema_norms_before_the_first_step():
    model = Net()
    sched = SonGokuScheduler(model, specs(), torch.optim.SGD(model.parameters(), lr=0.1))
    assert sched.debug_state()["ema_norms"] == {f"t{i}": 0.0 for i in range(K)}
    data = make_data(1)
    sched.step(data[0])
    norms = sched.debug_state()["ema_norms"]
    assert list(norms) == [f"t{i}" for i in range(K)] and all(v > 0 for v in norms.values())


@pytest.mark.parametrize(
    "kw", [{"refresh_period": 0}, {"refresh_period": 2.7}, {"min_updates_per_cycle": 0}]
)
def test_out_of_range_periods_raise_where_the_reference_clamped(kw):
    # the migration page's recipe for the reference's behaviour: max(1, int(x))
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=next(iter(kw))):
        SonGokuScheduler(model, specs(), opt, **kw)
    sched = SonGokuScheduler(model, specs(), opt, **{n: max(1, int(v)) for n, v in kw.items()})
    assert getattr(sched, next(iter(kw))) == max(1, int(next(iter(kw.values()))))


def run(model, sched, data):
    for batch in data:
        sched.step(batch)


@pytest.mark.parametrize("ema_mode", ["active", "refresh"])
def test_checkpoint_and_resume_gives_identical_parameters(ema_mode):
    r_period = 3
    data = make_data(3 * r_period + 2)

    def build():
        model = Net()
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        sched = SonGokuScheduler(
            model,
            specs(),
            opt,
            refresh_period=r_period,
            tau_schedule=TauSchedule("constant", tau_target=-0.3),
            ema_mode=ema_mode,
            base_method="pcgrad",
        )
        return model, opt, sched

    model_a, _, sched_a = build()
    run(model_a, sched_a, data)

    model_b, opt_b, sched_b = build()
    run(model_b, sched_b, data[:4])
    buf = io.BytesIO()
    torch.save({"m": model_b.state_dict(), "o": opt_b.state_dict(), "s": sched_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model_c, opt_c, sched_c = build()
    model_c.load_state_dict(ckpt["m"])
    opt_c.load_state_dict(ckpt["o"])
    sched_c.load_state_dict(ckpt["s"])
    run(model_c, sched_c, data[4:])
    assert sched_c.t == sched_a.t
    assert sched_c.schedule_snapshot() == sched_a.schedule_snapshot()
    for name, p in params_of(model_a).items():
        assert torch.equal(params_of(model_c)[name], p), name


def test_heads_are_found_without_filters_and_inactive_heads_get_no_gradient():
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    # shared filter excludes the heads and no head filter is given (spec §5.9)
    sched = SonGokuScheduler(
        model,
        specs(),
        opt,
        shared_param_filter=lambda p: any(p is q for q in model.trunk.parameters()),
        refresh_period=2,
        tau_schedule=TauSchedule("constant", tau_target=-0.5),
    )
    data = make_data(8)
    before = params_of(model)
    sched.step(data[0])
    after = params_of(model)
    assert all(not torch.equal(before[n], after[n]) for n in before)  # heads do train
    assert sched.debug_state()["head_params"]["t2"] == ["heads.2.weight", "heads.2.bias"]
    sched.step(data[1])  # refresh here
    assert len(sched.schedule_snapshot()) > 1
    for batch in data[2:5]:
        active = {int(n[1:]) for n in sched.step(batch)}
        for i in range(K):
            for p in model.heads[i].parameters():
                assert (p.grad is None) == (i not in active)


def PartlyShared():
    """A trunk for every task plus a layer (``pair``) only tasks 0 and 1 use."""
    return TrunkHeads(3, 4, 3, partial=2, dtype=torch.float64, seed=0)


def test_shared_parameters_untouched_by_the_group_get_none():
    model = PartlyShared()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    sched = SonGokuScheduler(
        model,
        specs(3),
        opt,
        refresh_period=1,
        tau_schedule=TauSchedule("constant", tau_target=-1.0),
    )
    data = make_data(4, k=3)
    sched.step(data[0])  # complete graph after the refresh: every task alone
    assert sched.schedule_snapshot() == [["t0"], ["t1"], ["t2"]]
    shared = sched.debug_state()["shared_params"]
    assert shared == ["trunk.0.weight", "trunk.0.bias", "pair.weight", "pair.bias"]
    pair_before = model.pair.weight.detach().clone()
    for batch in data[1:4]:
        active = list(sched.step(batch))
        if active == ["t2"]:
            assert model.pair.weight.grad is None
            assert torch.equal(model.pair.weight.detach(), pair_before)
        pair_before = model.pair.weight.detach().clone()


def test_refresh_batch_provider_is_used_at_refresh():
    calls = []

    def provider(i):
        def get():
            calls.append(i)
            return make_data(1, seed=100 + len(calls))[0][f"t{i}"]

        return get

    model = Net()
    tasks = [TaskSpec(f"t{i}", task_loss(i), refresh_batch_provider=provider(i)) for i in range(K)]
    sched = SonGokuScheduler(
        model, tasks, torch.optim.SGD(model.parameters(), lr=0.1), refresh_period=3
    )
    run(model, sched, make_data(6))
    assert sorted(calls) == sorted(list(range(K)) * 2)
    assert sched.state.ema_count.tolist() == [8, 8, 8, 8]  # 6 active steps + 2 refresh probes


def test_reference_style_gradient_transform_hook():
    seen = []

    def hook(grads):
        seen.append(sorted(grads))
        return {name: torch.zeros_like(g) for name, g in grads.items()}

    model = Net()
    sched = SonGokuScheduler(
        model,
        specs(),
        torch.optim.SGD(model.parameters(), lr=0.1),
        gradient_transform=hook,
        refresh_period=50,
    )
    trunk = model.trunk[0].weight.detach().clone()
    head = model.heads[0].weight.detach().clone()
    sched.step(make_data(1)[0])
    assert seen == [["t0", "t1", "t2", "t3"]]
    assert torch.equal(model.trunk[0].weight.detach(), trunk)  # hook zeroed the shared update
    assert not torch.equal(model.heads[0].weight.detach(), head)


def test_base_method_overrides_the_hook_with_a_warning_as_in_the_reference():
    def hook(grads):
        raise AssertionError("the hook must not run: base_method overrides it")

    model = Net()
    with pytest.warns(UserWarning, match="overrides gradient_transform"):
        sched = SonGokuScheduler(
            model,
            specs(),
            torch.optim.SGD(model.parameters(), lr=0.1),
            base_method="pcgrad_sum",
            gradient_transform=hook,
        )
    sched.step(make_data(1)[0])  # PCGrad ran, the hook did not
    assert sched.state.aggregator.count.item() == 1


def test_shared_is_found_or_filtered_not_passed():
    model = Net()
    with pytest.raises(TypeError, match="shared_param_filter"):
        SonGokuScheduler(
            model, specs(), torch.optim.SGD(model.parameters(), lr=0.1), shared=["trunk.0.weight"]
        )


def test_non_finite_batch_skips_the_step():
    model = Net()
    sched = SonGokuScheduler(model, specs(), torch.optim.Adam(model.parameters(), lr=0.1))
    data = make_data(2)
    sched.step(data[0])
    before = params_of(model)
    x, y = data[1]["t1"]
    data[1]["t1"] = (x, y * float("nan"))
    losses = sched.step(data[1])
    assert math.isnan(losses["t1"])
    assert sched.debug_state()["skipped"] and sched.t == 1
    for name, p in params_of(model).items():
        assert torch.equal(p, before[name])


def test_clear_errors():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="empty"):
        SonGokuScheduler(model, [], opt)
    with pytest.raises(ValueError, match="duplicate"):
        SonGokuScheduler(model, [TaskSpec("a", task_loss(0)), TaskSpec("a", task_loss(1))], opt)
    with pytest.raises(TypeError, match="TaskSpec"):
        SonGokuScheduler(model, [("a", task_loss(0))], opt)
    with pytest.raises(ValueError, match="tau_target"):
        SonGokuScheduler(model, specs(), opt, tau_schedule=TauSchedule(tau_target=2.0))
    with pytest.raises(ValueError, match="refresh_period"):
        SonGokuScheduler(model, specs(), opt, refresh_period=0)
    with pytest.raises(ValueError, match="base_method"):
        SonGokuScheduler(model, specs(), opt, base_method="mgda")
    sched = SonGokuScheduler(
        model, specs(), opt, refresh_period=1, tau_schedule=TauSchedule("constant", tau_target=-1.0)
    )
    data = make_data(2)
    with pytest.raises(ValueError, match="unknown task"):
        sched.step({**data[0], "t9": data[0]["t0"]})
    with pytest.raises(ValueError, match="missing"):
        sched.step({"t0": data[0]["t0"]})
    with pytest.raises(TypeError, match="batches_by_task"):
        sched.step([data[0]])
    sched.step(data[0])  # every task alone from now on
    active = sched.schedule_snapshot()[0][0]
    with pytest.raises(ValueError, match=f"active task.*{active}"):
        sched.step({n: b for n, b in data[1].items() if n != active})
    sched.step({active: data[1][active]})  # only the active batch is needed


QUICK_START = """
import torch
from torch import nn, optim
from son_goku import SonGokuScheduler, TauSchedule, TaskSpec

# Define your model with a shared backbone and task-specific heads.
class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.head_a = nn.Linear(16, 3)
        self.head_b = nn.Linear(16, 2)
    def forward(self, x):
        h = self.backbone(x)
        return h, self.head_a(h), self.head_b(h)

model = Model()
opt = optim.Adam(model.parameters(), lr=1e-3)

# Tasks: provide loss functions (and optional refresh-time batch providers)
def loss_task_a(model, batch):
    h, za, zb = model(batch["x"])  # batch is a dict with 'x', 'ya', 'yb'
    return torch.nn.functional.cross_entropy(za, batch["ya"])
def loss_task_b(model, batch):
    h, za, zb = model(batch["x"])
    return torch.nn.functional.cross_entropy(zb, batch["yb"])

# Optional: filters to mark task-specific head parameters (so only active heads update)
head_a_filter = lambda p: hasattr(model, "head_a") and (p is model.head_a.weight or p is model.head_a.bias)
head_b_filter = lambda p: hasattr(model, "head_b") and (p is model.head_b.weight or p is model.head_b.bias)

tasks = [
    TaskSpec(name="task_a", loss_fn=loss_task_a, refresh_batch_provider=None, head_param_filter=head_a_filter),
    TaskSpec(name="task_b", loss_fn=loss_task_b, refresh_batch_provider=None, head_param_filter=head_b_filter),
]

# Shared-parameter filter: treat everything except heads as shared
def shared_filter(p):
    return (p is model.head_a.weight or p is model.head_a.bias or p is model.head_b.weight or p is model.head_b.bias) == False

tau = TauSchedule(kind="log", tau_initial=1.0, tau_target=0.25, warmup_steps=100, anneal_duration=400)
sched = SonGokuScheduler(
    model, tasks, opt,
    shared_param_filter=shared_filter,
    refresh_period=32,
    tau_schedule=tau,
    ema_beta=0.9,
    min_updates_per_cycle=1,
)

# Drive the scheduler from your training data pipeline
batches = [
    {"task_a": {"x": torch.randn(8,16), "ya": torch.randint(0,3,(8,))},
     "task_b": {"x": torch.randn(8,16), "yb": torch.randint(0,2,(8,))}}
    for _ in range(1000)
]
for step in range(100):
    losses = sched.step(batches[step])
    if (step+1) % 32 == 0:
        print("Schedule:", sched.schedule_snapshot())
"""


def test_state_dict_is_a_copy_not_a_live_reference():
    model = TrunkHeads(3, 4, 1, out=2, seed=3)

    def loss_of(i):
        return lambda m, b: (m(b)[:, i] ** 2).mean()

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = SonGokuScheduler(
        model,
        [TaskSpec("a", loss_of(0)), TaskSpec("b", loss_of(1))],
        opt,
        shared_param_filter=lambda p: p is model.trunk[0].weight or p is model.trunk[0].bias,
        refresh_period=2,
    )
    x = torch.randn(8, 3)
    sched.step({"a": x, "b": x})
    saved = sched.state_dict()
    ema_before = {n: v.clone() for n, v in saved["core"]["ema"].items()}
    for _ in range(3):
        sched.step({"a": x, "b": x})
    for n, v in saved["core"]["ema"].items():
        assert torch.equal(v, ema_before[n])
    assert not all(torch.equal(v, sched.state.ema[n]) for n, v in saved["core"]["ema"].items())


def _poison(batch: dict, task: str, value: float) -> dict:
    x, y = batch[task]
    return {**batch, task: (x, torch.full_like(y, value))}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("mode", ["active", "refresh"])
def test_songoku_scheduler_non_finite_step_is_a_no_op(value, mode):
    data = abc_batches(8)

    def build():
        model = TrunkHeads(6, 8, 3, seed=0)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        kw = dict(refresh_period=2, ema_mode=mode, base_method="pcgrad")
        return model, SonGokuScheduler(model, abc_specs(), opt, **kw)

    model_a, sched_a = build()
    for b in data:
        sched_a.step(b)
    model_b, sched_b = build()
    for i, b in enumerate(data):
        if i in (1, 4):  # step 2 would trigger a refresh, step 5 is inside a window
            before = clone_tree(sched_b.state._asdict())
            params = [p.detach().clone() for p in model_b.parameters()]
            sched_b.step(_poison(b, "abc"[i % 3], value))
            after = sched_b.state._asdict()
            assert bool(after.pop("skipped"))
            before.pop("skipped")
            after.pop("losses")  # the skipped step's losses are recorded (documented)
            assert not bool(torch.isfinite(before.pop("losses") * 0 + sched_b.state.losses).all())
            assert tree_equal({k: after[k] for k in before}, before)
            assert all(torch.equal(p, q) for p, q in zip(params, model_b.parameters(), strict=True))
        sched_b.step(b)
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert tree_equal(sched_a.state._asdict(), sched_b.state._asdict())


# ---------------------------------------------------------------------------------------------
# no extra forward pass: shared parameters and heads come from the first step's own graph


@pytest.mark.parametrize("ema_mode", ["active", "refresh"])
@pytest.mark.parametrize("base_method", ["vanilla", "pcgrad"])
def test_first_step_runs_each_task_loss_exactly_once(ema_mode, base_method):
    calls = {f"t{i}": 0 for i in range(K)}

    def counted(i):
        def loss_fn(model, batch):
            calls[f"t{i}"] += 1
            return task_loss(i)(model, batch)

        return loss_fn

    model = Net()
    forwards = []
    model.register_forward_pre_hook(lambda m, args: forwards.append(args[1]))
    sched = SonGokuScheduler(
        model,
        [TaskSpec(f"t{i}", counted(i)) for i in range(K)],
        torch.optim.SGD(model.parameters(), lr=0.1),
        refresh_period=2,
        ema_mode=ema_mode,
        base_method=base_method,
        tau_schedule=TauSchedule("constant", tau_target=-1.0),
    )
    data = make_data(3)
    losses = sched.step(data[0])
    assert calls == {f"t{i}": 1 for i in range(K)}  # every task active, once each
    assert sorted(forwards) == list(range(K))
    assert set(losses) == set(calls)
    assert sched.debug_state()["shared_params"] == ["trunk.0.weight", "trunk.0.bias"]
    # the second step (it ends in a refresh: every task alone afterwards) runs each loss once more
    sched.step(data[1])
    assert calls == {f"t{i}": 2 for i in range(K)}
    (alone,) = sched.step(data[2])  # then only the active task's loss runs
    assert calls == {f"t{i}": 2 + (f"t{i}" == alone) for i in range(K)}
    assert len(forwards) == 2 * K + 1


@pytest.mark.parametrize("tau", [1.0, -1.0])  # one group of every task / one task per group
@pytest.mark.parametrize("mode", ["active", "refresh"])
def test_a_non_finite_gradient_behind_a_finite_loss_skips_the_step(tau, mode):
    """``0 · sqrt(|w|)`` at ``w = 0``: the loss is finite, its gradient is NaN (the plain-sum path
    tests the summed gradient, which must then cover every row)."""
    data = abc_batches(6)
    poisoned = {"on": False}

    def spike(spec):
        def loss(m, batch):
            out = spec.loss_fn(m, batch)
            if poisoned["on"]:
                w = m.trunk[0].weight
                out = out + 0.0 * torch.sqrt((w - w.detach()).abs()).sum()
            return out

        return TaskSpec(spec.name, loss)

    model = TrunkHeads(6, 8, 3, seed=0)
    sched = SonGokuScheduler(
        model,
        [spike(s) for s in abc_specs()],
        torch.optim.SGD(model.parameters(), lr=0.05),
        refresh_period=2,
        ema_mode=mode,
        tau_schedule=TauSchedule("constant", tau_target=tau),
    )
    for b in data[:3]:
        sched.step(b)
    before = clone_tree(sched.state._asdict())
    params = [p.detach().clone() for p in model.parameters()]
    poisoned["on"] = True
    losses = sched.step(data[3])
    assert all(math.isfinite(v) for v in losses.values())
    after = sched.state._asdict()
    assert bool(after.pop("skipped"))
    before.pop("skipped"), before.pop("losses"), after.pop("losses")
    assert tree_equal(after, before)
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters(), strict=True))
