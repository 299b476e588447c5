"""The caller's own training loop: ``SonGokuScheduler.backward`` / ``GradientConductor.backward``
only write ``p.grad``; zero_grad, clipping and the optimizer (or GradScaler) step are the
caller's, and the trajectory is bit-identical to the adapter stepping the optimizer itself."""

import io

import pytest
import torch

from gradfn.adapters import GradientConductor, SonGokuScheduler, TaskSpec
from tests._utils.asserts import tree_equal
from tests._utils.models import TrunkHeads
from tests.unit.adapters._problems import GC_LAMBDAS, GC_LOSSES, abc_batches, gc_provider

OPTIMS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.01),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
}


def _loss(k, sign):
    def loss(m, batch):
        x, y = batch
        return ((m(x, k) - sign * y) ** 2).mean()

    return loss


def _specs(providers):
    out = []
    for k, (name, sign) in enumerate(zip("abc", (1.0, 0.5, -1.0), strict=True)):
        provider = None
        if providers:  # its own generator: the same batches whenever it is called
            g = torch.Generator().manual_seed(50 + k)

            def provider(g=g):
                x = torch.randn(8, 6, generator=g)
                return x, x.sum(dim=1)

        out.append(TaskSpec(name, _loss(k, sign), refresh_batch_provider=provider))
    return out


def _build(optim, providers=False, own_loop=False, **kw):
    model = TrunkHeads(6, 8, 3, seed=0)
    opt = OPTIMS[optim](model.parameters())
    kw = {"refresh_period": 3, "base_method": "pcgrad", **kw}
    sched = SonGokuScheduler(model, _specs(providers), None if own_loop else opt, **kw)
    return model, opt, sched


def _poison(batch, task):
    x, y = batch[task]
    return {**batch, task: (x, y * float("nan"))}


def _own_step(opt, sched, batch):
    opt.zero_grad()
    info = sched.backward(batch)
    opt.step()
    return info


@pytest.mark.parametrize("optim", ["adam", "sgd"])
@pytest.mark.parametrize("ema_mode", ["active", "refresh"])
@pytest.mark.parametrize("providers", [False, True])
def test_backward_then_the_callers_step_is_bit_identical_to_step(optim, ema_mode, providers):
    data = abc_batches(11)
    data[4] = _poison(data[4], "b")  # a skipped step
    model_a, _, sched_a = _build(optim, providers, ema_mode=ema_mode)
    model_b, opt_b, sched_b = _build(optim, providers, own_loop=True, ema_mode=ema_mode)
    for i, batch in enumerate(data):
        losses = sched_a.step(batch)
        info = _own_step(opt_b, sched_b, batch)
        assert info["losses"].keys() == losses.keys() and info["active"] == list(losses)
        assert info["skipped"] == (i == 4) and info["step"] == sched_a.t == sched_b.t
        assert all(
            torch.equal(p, q)
            for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True)
        )
    assert tree_equal(sched_a.state_dict(), sched_b.state_dict())
    assert int(sched_b.state.refreshes) == 3


@pytest.mark.parametrize("optim", ["adam", "sgd"])
def test_a_skipped_backward_leaves_no_gradient_for_the_callers_step(optim):
    model, opt, sched = _build(optim, own_loop=True)
    data = abc_batches(2)
    _own_step(opt, sched, data[0])
    before = [p.detach().clone() for p in model.parameters()]
    opt_state = [s["step"].clone() if "step" in s else None for s in opt.state.values()]
    info = sched.backward(_poison(data[1], "a"))  # no zero_grad: backward overwrites p.grad
    assert info["skipped"]
    assert all(p.grad is None for p in model.parameters())
    opt.step()  # weight decay and momentum included: nothing moves
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))
    after = [s["step"].clone() if "step" in s else None for s in opt.state.values()]
    assert tree_equal(opt_state, after)


def test_grad_scaler_stepped_by_the_caller_matches_the_adapters_scaler():
    data = abc_batches(6)
    data[2] = _poison(data[2], "c")

    def scaler():
        return torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)

    scaler_a, scaler_b = scaler(), scaler()
    model_a, _, sched_a = _build("adam", scaler=scaler_a)
    model_b, opt_b, sched_b = _build("adam", own_loop=True, scaler=scaler_b)
    scales = []
    for batch in data:
        sched_a.step(batch)
        opt_b.zero_grad()
        info = sched_b.backward(batch)
        if info["skipped"]:  # p.grad = +inf: scaler.step skips, scaler.update backs off
            assert all(bool(torch.isinf(p.grad).all()) for p in model_b.parameters())
        scaler_b.step(opt_b)
        scaler_b.update()
        assert scaler_a.get_scale() == scaler_b.get_scale()
        scales.append(scaler_b.get_scale())
        assert all(
            torch.equal(p, q)
            for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True)
        )
    assert scales[2] == scales[1] * scaler_b.get_backoff_factor()


def test_gradient_clipping_by_the_caller():
    model, opt, sched = _build("sgd", own_loop=True)
    for batch in abc_batches(3):
        opt.zero_grad()
        sched.backward(batch)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) <= 1.001e-3
        opt.step()


def test_checkpoint_with_a_deferred_refresh_resumes_bit_identically():
    """The provider refresh due on step 3 waits for the caller's step; ``state_dict`` runs it."""
    data = abc_batches(8)
    model_a, opt_a, sched_a = _build("adam", providers=True, own_loop=True)
    for batch in data:
        _own_step(opt_a, sched_a, batch)
    model_b, opt_b, sched_b = _build("adam", providers=True, own_loop=True)
    for batch in data[:3]:
        _own_step(opt_b, sched_b, batch)
    assert sched_b._pending is not None
    buf = io.BytesIO()
    torch.save(
        {"model": model_b.state_dict(), "opt": opt_b.state_dict(), "s": sched_b.state_dict()}, buf
    )
    assert sched_b._pending is None
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_c, opt_c, sched_c = _build("adam", providers=True, own_loop=True)
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    sched_c.load_state_dict(ckpt["s"])
    # the providers' generators are the run's data stream: advance C's past the refresh B ran
    for t in sched_c.tasks:
        t.refresh_batch_provider()
    for batch in data[3:]:
        _own_step(opt_c, sched_c, batch)
    assert all(
        torch.equal(p, q) for p, q in zip(model_a.parameters(), model_c.parameters(), strict=True)
    )
    assert tree_equal(sched_a.state_dict(), sched_c.state_dict())


def test_clear_errors_for_the_optimizer():
    model, _, sched = _build("adam", own_loop=True)
    with pytest.raises(RuntimeError, match=r"optimizer=None.*backward"):
        sched.step(abc_batches(1)[0])
    with pytest.raises(TypeError, match=r"torch optimizer .* or None"):
        SonGokuScheduler(model, _specs(False), optimizer=object())


def test_backward_with_an_optimizer_never_steps_it():
    model, _, sched = _build("sgd")
    before = [p.detach().clone() for p in model.parameters()]
    sched.backward(abc_batches(1)[0])
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))
    assert any(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# GradientConductor: step already only writes p.grad; backward is the same call


def _gcond(**kw):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2)
    return model, GradientConductor(model, GC_LOSSES, GC_LAMBDAS, 3, **kw)


def test_gcond_backward_is_step():
    model_a, gc_a = _gcond()
    model_b, gc_b = _gcond()
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1)
    for i in range(3):
        stats_a, stats_b = gc_a.step(gc_provider(i)), gc_b.backward(gc_provider(i))
        assert stats_a == stats_b
        opt_a.step()
        opt_b.step()
    assert all(
        torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True)
    )


def test_gcond_proj_iters_is_an_int():
    _, gc = _gcond()
    stats = gc.step(gc_provider(0))
    assert type(stats["proj_iters"]) is int and type(stats["step"]) is int


def test_gcond_n_mod_k_error_names_the_classic_alternative():
    with pytest.raises(ValueError, match="stochastic_accumulation=False"):
        GradientConductor(torch.nn.Linear(5, 2), GC_LOSSES, GC_LAMBDAS, 4)
    GradientConductor(
        torch.nn.Linear(5, 2), GC_LOSSES, GC_LAMBDAS, 4, stochastic_accumulation=False
    )


def test_gcond_vector_loss_error_names_the_loss():
    losses = {**GC_LOSSES, "mix": lambda out, y: (out - y[:, None]) ** 2}
    gc = GradientConductor(torch.nn.Linear(5, 2), losses, GC_LAMBDAS, 3)
    with pytest.raises(ValueError, match=r"loss_fns\['mix'\] must return a scalar, got shape"):
        gc.step(gc_provider(0))
