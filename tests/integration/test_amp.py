"""Mixed precision: bf16 autocast and torch.amp.GradScaler (CPU) through the SON-GOKU transform
and adapter, against plain PyTorch autocast / unscaled runs written out here."""

from __future__ import annotations

import torch

from gradfn.adapters import GradientConductor, SonGokuScheduler, TaskSpec
from gradfn.algorithms import songoku
from gradfn.integrations.amp import poison_like, scale_losses, unscale
from tests._utils.asserts import assert_trees_close
from tests._utils.models import TrunkHeads

K = 3


def Net() -> TrunkHeads:
    """``Linear(4, 8) → tanh`` and three scalar heads; ``model(x)`` is ``(B, 3)``."""
    return TrunkHeads(4, 8, K, seed=0)


def task_loss(k: int):
    def loss_fn(model, batch):
        x, y = batch
        return ((model(x)[:, k].float() - y[:, k]) ** 2).mean()

    return loss_fn


def make_batch(step: int, poison: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(50 + step)
    x = torch.randn(6, 4, generator=g)
    w = torch.randn(4, generator=g)
    y = torch.stack([x @ w, -(x @ w), torch.cos(x[:, 1])], dim=1)
    if poison:
        x = x.clone()
        x[0, 0] = float("inf")
    return x, y


def functional_loss(params, batch):
    x, y = batch
    z = torch.tanh(x @ params["trunk.0.weight"].T + params["trunk.0.bias"])
    out = torch.stack(
        [z @ params[f"heads.{k}.weight"][0] + params[f"heads.{k}.bias"][0] for k in range(K)],
        dim=1,
    )
    return ((out - y) ** 2).mean(dim=0)


def scheduler(model, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tasks = [TaskSpec(f"t{k}", task_loss(k)) for k in range(K)]
    return SonGokuScheduler(model, tasks, opt, refresh_period=2, tau_schedule=None, **kw), opt


def all_tasks(batch):
    return {f"t{k}": batch for k in range(K)}


def assert_unchanged(after, before, ignore=("skipped", "losses")):
    """Every field of ``after`` (a state as a dict) but ``ignore`` equals ``before``, bit for bit."""
    for name, value in after.items():
        if name not in ignore:
            assert_trees_close(value, before[name], 0.0)


# ------------------------------------------------------------------------------------------
# functional core: loss_scale


def test_loss_scale_gives_unscaled_decisions_and_skips_on_overflow():
    params = {n: p.detach().clone() for n, p in Net().named_parameters()}
    tx = songoku(functional_loss, num_tasks=K, shared=lambda n: n.startswith("trunk"))
    s0 = tx.init(params)
    batch = make_batch(0)
    plain_state, plain_grads = tx.step(s0, params, batch)
    scale = torch.tensor(2.0**12)
    st, grads = tx.step(s0, params, batch, loss_scale=scale)
    assert not bool(st.skipped)
    assert_trees_close((st._asdict(), grads), (plain_state._asdict(), plain_grads), 1e-6)
    # a scale whose product overflows float32: the step is skipped, the state kept
    huge = torch.tensor(torch.finfo(torch.float32).max)
    st2, grads2 = tx.step(s0, params, batch, loss_scale=huge)
    assert bool(st2.skipped)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads2.values())
    assert_unchanged(st2._asdict(), s0._asdict())


# ------------------------------------------------------------------------------------------
# adapter: bf16 autocast


def test_bf16_autocast_first_step_matches_plain_autocast_backward():
    model = Net()
    sched, _ = scheduler(model, autocast_dtype=torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = make_batch(0)
    losses = sched.step(all_tasks(batch))
    # oracle: plain autocast forward + backward of every task (all tasks active at step 0)
    ref = Net()
    ref.load_state_dict({n: before[n] for n in before})
    expected = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    ref_losses = []
    for k in range(K):
        ref.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = task_loss(k)(ref, batch)
        loss.backward()
        ref_losses.append(loss.item())
        for n, p in ref.named_parameters():
            expected[n] += p.grad
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-6)
        assert p.grad.dtype == torch.float32
    assert [losses[f"t{k}"] for k in range(K)] == ref_losses
    # the forward really ran in bf16: an fp32 forward gives other losses
    fp32 = [task_loss(k)(ref, batch).item() for k in range(K)]
    assert max(abs(a - b) for a, b in zip(fp32, ref_losses, strict=True)) > 1e-5


# ------------------------------------------------------------------------------------------
# adapter: GradScaler on CPU


def test_grad_scaler_matches_unscaled_training_and_skips_an_overflow():
    steps = [make_batch(t) for t in range(6)]
    # oracle: no scaler and no poisoned step
    ref_model = Net()
    ref, _ = scheduler(ref_model)
    for batch in steps:
        ref.step(all_tasks(batch))

    model = Net()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    sched, _ = scheduler(model, scaler=scaler)
    scales = []
    for t, batch in enumerate(steps):
        if t == 3:  # an extra, poisoned step before batch 3
            before_state = sched.state._asdict()
            before_params = {n: p.detach().clone() for n, p in model.named_parameters()}
            sched.step(all_tasks(make_batch(t, poison=True)))
            assert bool(sched.state.skipped)
            assert_unchanged(sched.state._asdict(), before_state)
            for n, p in model.named_parameters():
                assert torch.equal(p.detach(), before_params[n])
            # scaler.step skipped the optimizer (SGD holds no state; the params did not move)
            assert scaler.get_scale() == scales[-1] * scaler.get_backoff_factor()
        sched.step(all_tasks(batch))
        assert not bool(sched.state.skipped)
        scales.append(scaler.get_scale())
    # the scale grew on schedule (growth_interval=2) around the back-off
    assert scales == [2.0**8, 2.0**9, 2.0**9, 2.0**8, 2.0**9, 2.0**9]
    assert_trees_close(sched.state._asdict(), ref.state._asdict(), 1e-6)
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7, msg=n)


def test_scale_helpers_keep_structure_and_dtype():
    scale = torch.tensor(2.0**16)
    f = scale_losses(lambda p, b: {"a": p * b, "b": [p, b]}, scale)
    out = f(torch.tensor(3.0), torch.tensor(0.5))
    assert out["a"].item() == 1.5 * 2**16 and out["b"][1].item() == 0.5 * 2**16
    # a half-precision leaf is divided in float32: 2^16 itself does not fit in float16
    tree = {"h": torch.tensor([2.0**15], dtype=torch.float16), "d": torch.ones(2).double()}
    back = unscale(tree, scale)
    assert back["h"].dtype == torch.float16 and back["h"].item() == 0.5
    assert back["d"].dtype == torch.float64 and torch.equal(
        back["d"], torch.full((2,), 2.0**-16).double()
    )
    assert unscale(tree, None) is tree and scale_losses(f, None) is f
    assert torch.isinf(poison_like(torch.zeros(3))).all()


# ------------------------------------------------------------------------------------------
# GradientConductor adapter


def gcond_losses():
    return {
        f"t{k}": (lambda out, y, k=k: ((out[:, k].float() - y[:, k]) ** 2).mean()) for k in range(K)
    }


def gcond(model, **kw):
    return GradientConductor(model, gcond_losses(), {f"t{k}": 1.0 for k in range(K)}, 3, **kw)


def test_gcond_bf16_autocast_matches_plain_autocast_backward():
    # no resolution (every threshold at -1) and no momentum: the output is Σ_k mean_b ∇L_k
    model = Net()
    gc = gcond(
        model,
        autocast_dtype=torch.bfloat16,
        stochastic_accumulation=False,
        momentum_beta=0.0,
        conflict_thresholds=(-1.0, -1.0, -1.0),
    )
    micro = [make_batch(10 + i) for i in range(3)]
    ref = Net()
    gc.step(iter(micro).__next__)
    expected = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    for b in micro:
        for loss_fn in gcond_losses().values():
            ref.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(ref(b[0]), b[1])
            loss.backward()
            for n, p in ref.named_parameters():
                expected[n] += p.grad / len(micro)
    for n, p in model.named_parameters():
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-6, msg=n)


def test_gcond_grad_scaler_unscales_once_and_skips_an_overflow():
    cycles = [[make_batch(20 + 3 * c + i) for i in range(3)] for c in range(4)]
    ref_model = Net()
    ref = gcond(ref_model)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05)
    for micro in cycles:
        ref_opt.zero_grad()
        ref.step(iter(micro).__next__)
        ref_opt.step()

    model = Net()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    gc = gcond(model, scaler=scaler)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for c, micro in enumerate(cycles):
        if c == 2:  # an extra cycle whose data overflows
            before = gc.state.inner.inner  # the algorithm state: resolution memory, momentum
            params = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt.zero_grad()
            stats = gc.step(iter([micro[0], make_batch(0, poison=True), micro[2]]).__next__)
            assert stats["skipped"]
            scaler.step(opt)
            scaler.update()
            assert scaler.get_scale() == 2.0**7
            assert_trees_close(gc.state.inner.inner, before, 0.0)
            for n, p in model.named_parameters():
                assert torch.equal(p.detach(), params[n])
        opt.zero_grad()
        stats = gc.step(iter(micro).__next__)
        assert not stats["skipped"]
        # p.grad holds the GCond output times the scale: unscaled exactly once by scaler.step
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        assert scale in (2.0**8, 2.0**7)
    assert int(gc.state.num_skipped) == 1 and int(ref.state.num_skipped) == 0
    assert_trees_close(
        (gc.state.inner.inner, gc.state.stats), (ref.state.inner.inner, ref.state.stats), 1e-6
    )
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7, msg=n)
