"""SonGokuScheduler (the nn.Module adapter) against a plain PyTorch loop written out here."""

import io
import math

import pytest
import torch
from torch import nn

from gradfn import SonGokuScheduler, TaskSpec, TauSchedule

K = 4


class Net(nn.Module):
    def __init__(self, k=K, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Linear(3, 6).double()
        self.heads = nn.ModuleList(nn.Linear(6, 1).double() for _ in range(k))

    def forward(self, x, k):
        return self.heads[k](torch.tanh(self.trunk(x))).squeeze(-1)


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


def plain_loop(model, opt, data, r_period, tau, beta, eps=1e-12):
    """The paper's loop (spec §1.9), one forward + backward per active task, naive everything."""
    shared = list(model.trunk.parameters())
    heads = [list(h.parameters()) for h in model.heads]
    ema = [None] * K
    classes = [list(range(K))]
    ptr, t = 0, 0
    history = []
    for batch in data:
        active = classes[ptr]
        history.append(list(active))
        shared_sum = [torch.zeros_like(p) for p in shared]
        head_grads = {}
        for i in active:
            model.zero_grad(set_to_none=True)
            task_loss(i)(model, batch[f"t{i}"]).backward()
            g = [p.grad.clone() for p in shared]
            shared_sum = [a + b for a, b in zip(shared_sum, g, strict=True)]
            head_grads[i] = [p.grad.clone() for p in heads[i]]
            flat = torch.cat([x.reshape(-1) for x in g])
            ema[i] = (1 - beta) * flat if ema[i] is None else beta * ema[i] + (1 - beta) * flat
        opt.zero_grad(set_to_none=True)
        for p, g in zip(shared, shared_sum, strict=True):
            p.grad = g
        for i in active:
            for p, g in zip(heads[i], head_grads[i], strict=True):
                p.grad = g
        opt.step()
        t += 1
        ptr = (ptr + 1) % len(classes)
        if t % r_period == 0:
            nbrs = {i: set() for i in range(K)}
            for i in range(K):
                for j in range(K):
                    if i == j:
                        continue
                    ni = float(ema[i].norm()) + eps
                    nj = float(ema[j].norm()) + eps
                    if -float(ema[i] @ ema[j]) / (ni * nj) > tau:
                        nbrs[i].add(j)
            order = sorted(range(K), key=lambda v: (-len(nbrs[v]), v))
            classes = []
            for v in order:
                for cls in classes:
                    if not nbrs[v] & set(cls):
                        cls.append(v)
                        break
                else:
                    classes.append([v])
            classes = [sorted(c) for c in classes]
            ptr = 0
    return history, classes


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("optim", ["adam", "sgd"])
def test_matches_a_plain_pytorch_loop_after_three_refresh_periods(optim):
    r_period, tau = 4, -0.3
    data = make_data(3 * r_period)

    def opt_for(model):
        if optim == "adam":
            return torch.optim.Adam(model.parameters(), lr=0.05)
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    ref = Net()
    ref_opt = opt_for(ref)
    history, classes = plain_loop(ref, ref_opt, data, r_period, tau, beta=0.9)
    assert max(len(h) for h in history) == K and min(len(h) for h in history) < K  # real groups

    model = Net()
    sched = SonGokuScheduler(
        model,
        specs(),
        opt_for(model),
        shared_param_filter=lambda p: any(p is q for q in model.trunk.parameters()),
        refresh_period=r_period,
        tau_schedule=TauSchedule("constant", tau_target=tau),
        ema_beta=0.9,
    )
    seen = []
    for batch in data:
        seen.append(sorted(int(n[1:]) for n in sched.step(batch)))
    assert seen == history
    assert sched.schedule_snapshot() == [[f"t{i}" for i in c] for c in classes]
    got, want = params_of(model), params_of(ref)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-10)


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


class PartlyShared(nn.Module):
    """A trunk for every task plus a layer only tasks 0 and 1 use."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(3, 4).double()
        self.pair = nn.Linear(4, 4).double()
        self.heads = nn.ModuleList(nn.Linear(4, 1).double() for _ in range(3))

    def forward(self, x, k):
        h = torch.tanh(self.trunk(x))
        if k < 2:
            h = torch.tanh(self.pair(h))
        return self.heads[k](h).squeeze(-1)


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
    assert shared == ["trunk.weight", "trunk.bias", "pair.weight", "pair.bias"]
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
    trunk = model.trunk.weight.detach().clone()
    head = model.heads[0].weight.detach().clone()
    sched.step(make_data(1)[0])
    assert seen == [["t0", "t1", "t2", "t3"]]
    assert torch.equal(model.trunk.weight.detach(), trunk)  # hook zeroed the shared update
    assert not torch.equal(model.heads[0].weight.detach(), head)


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
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))

    def loss_of(i):
        return lambda m, b: (m(b)[:, i] ** 2).mean()

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = SonGokuScheduler(
        model,
        [TaskSpec("a", loss_of(0)), TaskSpec("b", loss_of(1))],
        opt,
        shared_param_filter=lambda p: p is model[0].weight or p is model[0].bias,
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
