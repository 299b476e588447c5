"""One forward per distinct input (``share_forward``): the trunk runs once per step when the tasks
share a batch object, the gradients are those of a plain one-forward loop, and nothing is shared
that must not be."""

import pytest
import torch
from torch import nn

from gradfn.adapters import SonGokuScheduler, TaskSpec, TauSchedule
from gradfn.adapters._shared_forward import shared_forward
from tests._utils.models import TrunkHeads

K = 3


def head_loss(k):
    def loss_fn(model, batch):
        x, y = batch
        return ((model(x, k) - (k + 1) * y) ** 2).mean()

    return loss_fn


def all_heads_loss(k):
    """Seed style: the model returns every head; the task reads its own column."""

    def loss_fn(model, batch):
        x, y = batch
        return ((model(x)[:, k] - (k + 1) * y) ** 2).mean()

    return loss_fn


def one_batch_per_step(n, seed=1, shared=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(6, 4, generator=g, dtype=torch.float64)
        batch = (x, x.sum(dim=1))
        out.append({f"t{i}": batch if shared else (x.clone(), batch[1].clone()) for i in range(K)})
    return out


def count_trunk_forwards(model):
    calls = []
    model.trunk[0].register_forward_hook(lambda *_: calls.append(1))
    return calls


def scheduler(model, loss, share, **kw):
    kw.setdefault("tau_schedule", TauSchedule("constant", tau_target=1.0))  # one group
    return SonGokuScheduler(
        model,
        [TaskSpec(f"t{i}", loss(i)) for i in range(K)],
        torch.optim.SGD(model.parameters(), lr=0.05),
        refresh_period=4,
        share_forward=share,
        **kw,
    )


@pytest.mark.parametrize("loss", [head_loss, all_heads_loss])
@pytest.mark.parametrize("ema_mode", ["active", "refresh"])
def test_one_trunk_forward_per_step_and_the_same_trajectory(loss, ema_mode):
    data = one_batch_per_step(9)
    runs = {}
    for share in (True, False):
        model = TrunkHeads(4, 8, K, dtype=torch.float64, seed=3)
        calls = count_trunk_forwards(model)
        sched = scheduler(model, loss, share, ema_mode=ema_mode)
        per_step = []
        for batches in data:
            before = len(calls)
            sched.step(batches)
            per_step.append(len(calls) - before)
        runs[share] = (model, per_step, sched.state)
    assert runs[True][1] == [1] * len(data)  # every task active, one trunk forward
    assert runs[False][1] == [K] * len(data)
    for p, q in zip(runs[True][0].parameters(), runs[False][0].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(runs[True][2].ema, runs[False][2].ema, rtol=1e-12, atol=1e-12)


def test_tasks_with_their_own_batches_run_their_own_forward():
    model = TrunkHeads(4, 8, K, dtype=torch.float64, seed=3)
    calls = count_trunk_forwards(model)
    sched = scheduler(model, head_loss, True)
    sched.step(one_batch_per_step(1, shared=False)[0])
    assert len(calls) == K


def test_one_dropout_mask_for_every_task_as_in_a_plain_loop():
    """With dropout the shared forward equals a plain loop's single forward (same seed)."""
    data = one_batch_per_step(3)
    model = TrunkHeads(4, 8, K, dropout=0.5, dtype=torch.float64, seed=3)
    plain = TrunkHeads(4, 8, K, dropout=0.5, dtype=torch.float64, seed=3)
    sched = scheduler(model, head_loss, True, ema_mode="refresh")
    opt = torch.optim.SGD(plain.parameters(), lr=0.05)
    for i, batches in enumerate(data):
        torch.manual_seed(100 + i)
        sched.step(batches)
        torch.manual_seed(100 + i)
        x, y = batches["t0"]
        h = plain.features(x)  # one dropout mask
        total = sum(((plain._head(h, k).squeeze(-1) - (k + 1) * y) ** 2).mean() for k in range(K))
        opt.zero_grad()
        total.backward()
        opt.step()
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_shared_forward_matches_by_identity_grad_mode_and_restores_the_module():
    runs = []

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x, scale=1.0):
            runs.append(1)
            return self.lin(x) * scale

    m = M()
    x = torch.randn(3, 2)
    with shared_forward(m):
        a = m(x)
        assert m(x) is a and len(runs) == 1
        assert m(x.clone()) is not a and len(runs) == 2  # equal values, another object
        assert m(x, scale=2.0) is not a and len(runs) == 3
        with torch.no_grad():
            b = m(x)
        assert b is not a and not b.requires_grad and len(runs) == 4
        assert m.lin(x) is m.lin(x)  # a direct submodule is shared too
    assert "forward" not in m.__dict__ and "forward" not in m.lin.__dict__
    assert m(x) is not m(x)
    with pytest.raises(RuntimeError, match="boom"), shared_forward(m):
        raise RuntimeError("boom")
    assert "forward" not in m.__dict__


def test_share_forward_must_be_a_bool():
    model = TrunkHeads(4, 8, K, seed=3)
    with pytest.raises(TypeError, match="share_forward"):
        scheduler(model, head_loss, "yes")
