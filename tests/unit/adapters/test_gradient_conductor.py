"""GradientConductor (the nn.Module adapter) against a plain-PyTorch GCond loop."""

from __future__ import annotations

import copy
import io
import math
from collections import deque

import optree
import pytest
import torch
from torch import nn

from gradfn.adapters import GradientConductor
from tests._utils import oracles
from tests._utils.asserts import tree_equal
from tests._utils.models import TrunkHeads
from tests.unit.adapters._problems import GC_LAMBDAS, GC_LOSSES, gc_provider


def Net(seed=0):
    """``Linear(4, 8) → tanh → Linear(8, 2)``, and an ``unused`` layer touched by no loss."""
    return TrunkHeads(4, 8, 1, out=2, unused=True, seed=seed)


LOSSES = {
    "fit": lambda out, y: ((out[:, 0] - y[:, 0]) ** 2).mean(),
    "anti": lambda out, y: ((out[:, 0] + y[:, 0]) ** 2).mean(),
    "aux": lambda out, y: ((out[:, 1] - y[:, 1]) ** 2).mean(),
}
LAMBDAS = {"fit": 1.0, "anti": 0.6, "aux": 0.3}


def data(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6, 4, generator=gen), 3 * torch.randn(6, 2, generator=gen)) for _ in range(n)
    ]


def provider(batches):
    it = iter(batches)
    return lambda: next(it)


class PlainGCond:
    """GCond written plainly (smooth rule, the resolution of tests._utils.oracles), over flattened
    gradient vectors, with the reference's separate forward + backward per loss and per
    micro-batch."""

    def __init__(
        self,
        model,
        n,
        *,
        beta=0.85,
        ema_beta=0.95,
        window=3,
        cap=None,
        eps=1e-8,
        stochastic=True,
        stability="raw",
        arbitrate_weak=False,
        floor_sq=None,
    ):
        self.model, self.n, self.beta, self.ema_beta = model, n, beta, ema_beta
        self.window, self.cap, self.eps, self.stochastic = window, cap, eps, stochastic
        self.stability, self.arbitrate_weak = stability, arbitrate_weak
        self.floor_sq = eps * eps if floor_sq is None else floor_sq
        self.params = [p for p in model.parameters() if p.requires_grad]
        size = sum(p.numel() for p in self.params)
        self.names = list(LOSSES)
        self.prev = {k: torch.zeros(size) for k in self.names}
        self.ema = {k: 1.0 for k in self.names}
        self.hist = deque(maxlen=window)
        self.m = torch.zeros(size)
        self.t = 0

    def _grad(self, name, batch, divisor):
        x, y = batch
        loss = LOSSES[name](self.model(x), y) * LAMBDAS[name] / divisor
        gs = torch.autograd.grad(loss, self.params, allow_unused=True)
        flat = [
            torch.zeros(p.numel()) if g is None else g.reshape(-1)
            for g, p in zip(gs, self.params, strict=True)
        ]
        return torch.cat(flat), [g is None for g in gs]

    def step(self, next_batch):
        size = self.m.numel()
        acc = {k: torch.zeros(size) for k in self.names}
        unused = None
        if self.stochastic:
            s = self.n // len(self.names)
            for k in self.names:
                for _ in range(s):
                    g, u = self._grad(k, next_batch(), s)
                    acc[k] += g
                    unused = (
                        u if unused is None else [a and b for a, b in zip(unused, u, strict=True)]
                    )
        else:
            for _ in range(self.n):
                batch = next_batch()
                for k in self.names:
                    g, u = self._grad(k, batch, self.n)
                    acc[k] += g
                    unused = (
                        u if unused is None else [a and b for a, b in zip(unused, u, strict=True)]
                    )
        raw = {k: v.clone() for k, v in acc.items()}
        eps = self.eps
        for k in self.names:
            r = float(acc[k].norm())
            self.ema[k] = max(self.ema_beta * self.ema[k] + (1 - self.ema_beta) * r, eps)
            if self.cap is not None and r > self.cap:
                acc[k] = acc[k] * self.cap / (r + eps)
        g, iters, _, hist = oracles.gcond_resolve(
            [acc[k] for k in self.names],
            eps=eps,
            floor_sq=self.floor_sq,
            ema=[self.ema[k] for k in self.names],
            prev=[self.prev[k] for k in self.names],
            history=list(self.hist),
            window=self.window,
            arbitrate_weak=self.arbitrate_weak,
        )
        self.hist = deque(hist, maxlen=self.window)
        total = sum(g)
        self.t += 1
        self.m = self.beta * self.m + (1 - self.beta) * total
        update = self.m / (1 - self.beta**self.t)
        offset = 0
        for p, none in zip(self.params, unused, strict=True):
            p.grad = None if none else update[offset : offset + p.numel()].reshape(p.shape).clone()
            offset += p.numel()
        source = raw if self.stability == "raw" else dict(zip(self.names, g, strict=True))
        self.prev = {k: source[k].clone() for k in self.names}
        return iters


def _grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("stochastic", "options", "plain_options"),
    [
        (False, {}, {}),
        (True, {"norm_cap": 0.5}, {"cap": 0.5}),
        (
            False,
            {
                "stability_source": "processed",
                "arbitrate_weak": True,
                "norm_floor": 1e-4,
                "dominance_window": 2,
            },
            {"stability": "processed", "arbitrate_weak": True, "floor_sq": 1e-8, "window": 2},
        ),
    ],
)
def test_adapter_matches_plain_pytorch_loop(stochastic, options, plain_options):
    n = 6
    ours, theirs = Net(), Net()
    gc = GradientConductor(ours, LOSSES, LAMBDAS, n, stochastic_accumulation=stochastic, **options)
    plain = PlainGCond(theirs, n, stochastic=stochastic, **plain_options)
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.05)
    opt_b = torch.optim.SGD(theirs.parameters(), lr=0.05)
    resolved = 0
    for step in range(7):
        batches = data(n, seed=step)
        opt_a.zero_grad()
        stats = gc.step(provider(batches))
        opt_b.zero_grad()
        iters = plain.step(provider(batches))
        resolved += iters
        assert stats["proj_iters"] == iters
        assert stats["step"] == step + 1
        ga, gb = _grads(ours), _grads(theirs)
        for name in ga:
            if gb[name] is None:
                assert ga[name] is None, name
            else:
                assert torch.allclose(ga[name], gb[name], atol=1e-5, rtol=1e-4), (step, name)
        opt_a.step()
        opt_b.step()
    assert resolved > 0  # the losses do conflict
    assert _grads(ours)["unused.weight"] is None


def test_stats_keys_and_values():
    gc = GradientConductor(Net(), LOSSES, LAMBDAS, 3, stochastic_accumulation=False)
    stats = gc.step(provider(data(3)))
    expected = {
        "final_grad_norm",
        "step",
        "proj_iters",
        "min_cosine_sim",
        "min_cosine_after",
        "skipped",
    }
    for k in LOSSES:
        expected |= {f"raw_norm/{k}", f"norm_ema/{k}", f"loss/{k}"}
    assert set(stats) == expected
    assert isinstance(stats["step"], int) and isinstance(stats["skipped"], bool)
    written = math.sqrt(
        sum(float((p.grad**2).sum()) for p in gc.module.parameters() if p.grad is not None)
    )
    assert stats["final_grad_norm"] == pytest.approx(written, rel=1e-5)
    for name, fn in LOSSES.items():  # loss/<k> is the λ-weighted mean over the micro-batches
        with torch.no_grad():
            mean = sum(float(fn(gc.module(b[0]), b[1])) for b in data(3)) / 3
        assert stats[f"loss/{name}"] == pytest.approx(LAMBDAS[name] * mean, rel=1e-4)


def test_checkpoint_resume_gives_identical_trajectory():
    n = 4
    kw = dict(stochastic_accumulation=False, momentum_beta=0.9)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gc = GradientConductor(model, LOSSES, LAMBDAS, n, **kw)
    for step in range(2):
        opt.zero_grad()
        gc.step(provider(data(n, seed=step)))
        opt.step()
    buf = io.BytesIO()
    torch.save({"gc": gc.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}, buf)
    sd = gc.state_dict()
    # a copy, not a live reference
    before = optree.tree_map(torch.clone, sd["state"])
    trajectory = []
    for step in range(2, 4):
        opt.zero_grad()
        trajectory.append(gc.step(provider(data(n, seed=step))))
        trajectory.append(_grads(model))
        opt.step()
    assert optree.tree_all(optree.tree_map(torch.equal, before, sd["state"]))

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = Net(seed=5)
    model2.load_state_dict(ckpt["model"])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05)
    opt2.load_state_dict(ckpt["opt"])
    gc2 = GradientConductor(model2, LOSSES, LAMBDAS, n, **kw)
    gc2.load_state_dict(ckpt["gc"])
    resumed = []
    for step in range(2, 4):
        opt2.zero_grad()
        resumed.append(gc2.step(provider(data(n, seed=step))))
        resumed.append(_grads(model2))
        opt2.step()
    for a, b in zip(trajectory, resumed, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert torch.equal(a[k], b[k]), k
            else:
                assert a[k] == b[k], k
    with pytest.raises(ValueError, match="losses"):
        GradientConductor(Net(), {"fit": LOSSES["fit"]}, {"fit": 1.0}, 2).load_state_dict(sd)


def BNDrop():
    """BatchNorm and Dropout in the trunk; ``seen_drop_training`` records, at each forward, the
    modes ``(dropout.training, batchnorm.training)``."""
    model = TrunkHeads(4, 6, 1, out=2, batchnorm=True, dropout=0.5, seed=0)
    model.bn = model.trunk[1]
    model.seen_drop_training = []
    model.register_forward_pre_hook(
        lambda m, args: m.seen_drop_training.append((m.drop.training, m.bn.training))
    )
    return model


def test_freeze_bn_freezes_batchnorm_only():
    model = BNDrop().train()
    losses = {"a": LOSSES["fit"], "b": LOSSES["aux"]}
    gc = GradientConductor(model, losses, {"a": 1.0, "b": 1.0}, 2, freeze_bn=True)
    mean0 = model.bn.running_mean.clone()
    gc.step(provider(data(2)))
    assert torch.equal(model.bn.running_mean, mean0)  # running statistics unchanged
    assert all(drop and not bn for drop, bn in model.seen_drop_training)  # dropout stays on
    assert model.training and model.bn.training and model.drop.training  # modes restored
    loose = GradientConductor(model, losses, {"a": 1.0, "b": 1.0}, 2, freeze_bn=False)
    loose.step(provider(data(2)))
    assert not torch.equal(model.bn.running_mean, mean0)
    model.seen_drop_training.clear()
    ref = GradientConductor(model, losses, {"a": 1.0, "b": 1.0}, 2, reference=True)
    ref.step(provider(data(2)))
    assert all(not drop and not bn for drop, bn in model.seen_drop_training)  # whole model eval


def test_classic_mode_runs_one_forward_per_microbatch():
    model = BNDrop().eval()
    gc = GradientConductor(
        model,
        {"a": LOSSES["fit"], "b": LOSSES["aux"]},
        {"a": 1.0, "b": 1.0},
        4,
        stochastic_accumulation=False,
        untouched_grad="zeros",
    )
    calls = []
    gc.step(lambda: calls.append(1) or data(1)[0])
    assert len(calls) == 4 and len(model.seen_drop_training) == 4  # the reference: 8


def test_untouched_params_none_or_zeros_and_skip_sets_none():
    gc = GradientConductor(Net(), LOSSES, LAMBDAS, 3, untouched_grad="zeros")
    gc.step(provider(data(3)))
    assert torch.equal(gc.module.unused.weight.grad, torch.zeros(2, 2))
    model = Net()
    gc = GradientConductor(model, LOSSES, LAMBDAS, 3)
    gc.step(provider(data(3)))
    bad = data(3)
    bad[0] = (bad[0][0], bad[0][1] * float("nan"))
    state = gc.state_dict()["state"]
    stats = gc.step(provider(bad))
    assert stats["skipped"] is True
    assert all(p.grad is None for p in model.parameters())
    after = gc.state_dict()["state"]
    # the algorithm state (resolution memory and momentum) is unchanged by the skipped cycle
    algorithm, algorithm_after = state["inner"]["inner"], after["inner"]["inner"]
    assert optree.tree_all(optree.tree_map(torch.equal, algorithm, algorithm_after))


def test_lion_and_return_raw_grad_through_adapter():
    model = Net()
    gc = GradientConductor(model, LOSSES, LAMBDAS, 3, use_lion=True, trust_ratio_coef=1e-3)
    gc.step(provider(data(3)))
    g = model.trunk[0].weight.grad
    assert torch.allclose(
        g.abs().unique()[-1:], g.abs().max().reshape(1)
    )  # one magnitude per tensor
    raw = GradientConductor(Net(), LOSSES, LAMBDAS, 3, return_raw_grad=True, momentum_beta=0.5)
    stats = raw.step(provider(data(3)))
    assert stats["step"] == 1


def test_constructor_errors():
    net = Net()
    with pytest.raises(ValueError, match="conflict_thresholds"):
        GradientConductor(net, LOSSES, LAMBDAS, 3, conflict_thresholds=(-0.5, -0.8, 0.0))
    with pytest.raises(ValueError, match="lambdas"):
        GradientConductor(net, LOSSES, {"fit": 1.0, "anti": 1.0}, 3)
    with pytest.raises(ValueError, match="empty"):
        GradientConductor(net, {}, {}, 3)
    with pytest.raises(ValueError, match="momentum_beta"):
        GradientConductor(net, LOSSES, LAMBDAS, 3, momentum_beta=1.0)
    with pytest.raises(ValueError, match="dominance_window"):
        GradientConductor(net, LOSSES, LAMBDAS, 3, dominance_window=-2)
    with pytest.raises(ValueError, match="divisible"):
        GradientConductor(net, LOSSES, LAMBDAS, 4)  # stochastic (the default) with 3 losses
    with pytest.raises(ValueError, match="ddp_sync"):
        GradientConductor(net, LOSSES, LAMBDAS, 3, ddp_sync="mean")
    with pytest.raises(ValueError, match="trust_ratio_coef"):
        GradientConductor(net, LOSSES, LAMBDAS, 3, trust_ratio_coef=0.0)
    with pytest.raises(ValueError, match="norm_ema_beta"):
        GradientConductor(net, LOSSES, LAMBDAS, 3, norm_ema_beta=-0.1)
    with pytest.raises(TypeError, match="loss_fns"):
        GradientConductor(net, {"fit": 3}, {"fit": 1.0}, 3)
    with pytest.raises(TypeError, match="model"):
        GradientConductor("net", LOSSES, LAMBDAS, 3)
    with pytest.raises(TypeError, match="scaler"):
        GradientConductor(net, LOSSES, LAMBDAS, 3, scaler=object())
    with pytest.raises(ValueError, match="autocast_dtype"):
        GradientConductor(net, LOSSES, LAMBDAS, 3, autocast_dtype=torch.int8)
    with pytest.warns(UserWarning, match="SUMMED"):
        GradientConductor(net, LOSSES, LAMBDAS, 3, ddp_sync="broadcast")
    gc = GradientConductor(net, LOSSES, LAMBDAS, 3, ddp_sync="none", projection_max_iters=0)
    with pytest.raises(TypeError, match="data_provider"):
        gc.step(data(3))


def test_call_conventions_args_kwargs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)

        def forward(self, x, *, scale=1.0):
            return self.a(x) * scale

    seen = {}

    def loss_kw(out, target, *, weight=1.0):
        seen["weight"] = weight
        return weight * ((out - target) ** 2).mean()

    def loss_plain(out, y):
        return out.abs().mean()

    model = Two()
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    batch = ({"args": (x,), "kwargs": {"scale": 2.0}}, {"args": (y,), "kwargs": {"weight": 3.0}})
    gc = GradientConductor(model, {"kw": loss_kw}, {"kw": 1.0}, 1, momentum_beta=0.0)
    gc.step(lambda: batch)
    assert seen["weight"] == 3.0
    ref = copy.deepcopy(model)
    loss = loss_kw(ref(x, scale=2.0), y, weight=3.0)
    loss.backward()
    assert torch.allclose(model.a.weight.grad, ref.a.weight.grad, atol=1e-6)
    # tuple input -> model(*x)
    gc2 = GradientConductor(model, {"p": loss_plain}, {"p": 1.0}, 1)
    gc2.step(lambda: ((x,), y))
    assert model.a.weight.grad is not None


def test_ddp_sync_with_a_single_process_group(tmp_path):
    """With an initialised process group the written gradients are all-reduced (world of one)."""
    import torch.distributed as dist

    model = Net()
    plain = GradientConductor(copy.deepcopy(model), LOSSES, LAMBDAS, 3)
    want = plain.step(provider(data(3)))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        gc = GradientConductor(model, LOSSES, LAMBDAS, 3, ddp_sync="avg")
        got = gc.step(provider(data(3)))
    finally:
        dist.destroy_process_group()
    assert got["final_grad_norm"] == pytest.approx(want["final_grad_norm"], rel=1e-6)
    assert torch.allclose(model.trunk[0].weight.grad, plain.module.trunk[0].weight.grad)


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("reference", [False, True])
def test_a_cycle_runs_one_forward_per_microbatch_from_the_first(stochastic, reference):
    n = 6
    model = Net()
    forwards = []
    model.register_forward_pre_hook(lambda m, args: forwards.append(1))
    fetched = []

    def counting(batches):
        it = iter(batches)
        return lambda: fetched.append(1) or next(it)

    gc = GradientConductor(
        model, LOSSES, LAMBDAS, n, stochastic_accumulation=stochastic, reference=reference
    )
    for cycle in range(2):
        forwards.clear()
        fetched.clear()
        gc.step(counting(data(n, seed=cycle)))
        assert len(fetched) == n and len(forwards) == n, cycle  # no extra (probe) pass


# ---------------------------------------------------------------------------------------------
# a non-finite cycle never corrupts the adapter


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_gradient_conductor_non_finite_cycle_is_a_no_op(value):
    def build():
        model = TrunkHeads(5, 6, 1, out=2, seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, betas=(0.0, 0.99))
        return model, opt, GradientConductor(model, GC_LOSSES, GC_LAMBDAS, 3, use_lion=False)

    def bad_provider():
        x = torch.randn(4, 5)
        return x, torch.full((4,), value)

    model_a, opt_a, gc_a = build()
    for s in range(4):
        opt_a.zero_grad()
        gc_a.step(gc_provider(s))
        opt_a.step()
    model_b, opt_b, gc_b = build()
    for s in range(4):
        if s == 2:
            before = gc_b.state_dict()["state"]
            opt_b.zero_grad()
            stats = gc_b.step(bad_provider)
            opt_b.step()
            assert stats["skipped"]
            assert all(p.grad is None for p in model_b.parameters())
            after = gc_b.state_dict()["state"]
            # the algorithm state is unchanged; the statistics describe the skipped cycle
            assert tree_equal(before["inner"]["inner"], after["inner"]["inner"])
            assert not tree_equal(before["stats"], after["stats"])
        opt_b.zero_grad()
        gc_b.step(gc_provider(s))
        opt_b.step()
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)
    sa, sb = gc_a.state_dict()["state"], gc_b.state_dict()["state"]
    assert int(sb["inner"].pop("num_skipped")) == 1 and int(sa["inner"].pop("num_skipped")) == 0
    assert tree_equal(sa, sb)


@pytest.mark.parametrize("stochastic", [True, False])
def test_compiled_adapter_matches_eager_through_a_skipped_cycle(stochastic):
    """compile= with the adapter's donated state: the resolution and momentum run compiled, the
    skip is decided eagerly; the run (a non-finite cycle included) matches the eager one."""

    def run(compile_arg):
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        gc = GradientConductor(
            model, LOSSES, LAMBDAS, 3, stochastic_accumulation=stochastic, compile=compile_arg
        )
        out = []
        for step in range(4):
            batches = data(3, seed=10 + step)
            if step == 2:
                batches[1] = (batches[1][0], batches[1][1] * float("nan"))
            opt.zero_grad()
            out.append(gc.step(provider(batches)))
            opt.step()
        return out, [p.detach().clone() for p in model.parameters()], gc.state_dict()

    eager, compiled = run(False), run("aot_eager")
    assert [s["skipped"] for s in compiled[0]] == [False, False, True, False]
    for a, b in zip(eager[0], compiled[0], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            x, y = float(a[key]), float(b[key])
            same_nan = math.isnan(x) and math.isnan(y)
            assert same_nan or math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-7), key
    for p, q in zip(eager[1], compiled[1], strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reference", [True, False])
def test_one_loss_leaves_the_norm_ema_alone(reference):
    """One loss: nothing to arbitrate, so the norm EMA (the arbitrator's strength) stays at its
    initial 1.0 and is not reported, as the reference does (its ``N == 1`` shortcut)."""
    gc = GradientConductor(Net(), {"fit": LOSSES["fit"]}, {"fit": 1.0}, 2, reference=reference)
    batches = data(6)
    for _ in range(3):
        stats = gc.step(provider(batches[:2]))
        batches = batches[2:]
    assert set(stats) == {
        "final_grad_norm",
        "step",
        "proj_iters",
        "min_cosine_sim",
        "min_cosine_after",
        "skipped",
        "raw_norm/fit",
        "loss/fit",
    }
    assert stats["raw_norm/fit"] > 0.1  # the norm is measured, not fed to an EMA
    assert gc.state.norm_ema.tolist() == [1.0]


def _bn_oracle(batches):
    """The running statistics of ``BNDrop``'s BatchNorm after a train-mode forward of each batch."""
    model = BNDrop().train()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    return model.bn


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("freeze_bn", [None, False, "running"])
def test_batchnorm_running_statistics_move_once_per_microbatch(stochastic, freeze_bn):
    """Default (without ``reference``), ``False`` and ``"running"``: each micro-batch updates the
    running statistics once, as one train-mode forward would; ``"running"`` normalises with the
    running statistics during the passes, the others with the batch's."""
    model = BNDrop().train()
    losses = {"a": LOSSES["fit"], "b": LOSSES["aux"]}
    kwargs = {} if freeze_bn is None else {"freeze_bn": freeze_bn}
    gc = GradientConductor(
        model, losses, {"a": 1.0, "b": 1.0}, 4, stochastic_accumulation=stochastic, **kwargs
    )
    batches = data(4)
    gc.step(provider(batches))
    want = _bn_oracle(batches)
    assert int(model.bn.num_batches_tracked) == 4
    torch.testing.assert_close(model.bn.running_mean, want.running_mean)
    torch.testing.assert_close(model.bn.running_var, want.running_var)
    batch_stats = freeze_bn != "running"
    assert [bn for _, bn in model.seen_drop_training] == [batch_stats] * 4
    assert model.bn.training  # mode restored
    assert not model.bn._forward_pre_hooks  # no hook left behind


def test_batchnorm_frozen_with_reference_by_default():
    model = BNDrop().train()
    losses = {"a": LOSSES["fit"], "b": LOSSES["aux"]}
    GradientConductor(model, losses, {"a": 1.0, "b": 1.0}, 2, reference=True).step(
        provider(data(2))
    )
    assert int(model.bn.num_batches_tracked) == 0
    with pytest.raises(ValueError, match="freeze_bn"):
        GradientConductor(model, losses, {"a": 1.0, "b": 1.0}, 2, freeze_bn="eval")
