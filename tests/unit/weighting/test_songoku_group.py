"""A loss weighting inside SON-GOKU's active group (``songoku(..., loss_weighting=...)``): the
weighting sees the ``K`` losses every step, its weights restricted to the group and renormalised
to sum to ``|S_t|`` scale the group's gradients. Checked against a hand-written loop (DWA's
formula written out here, per-task gradients by ``autograd.grad``); its state is checkpointed and
left as it was by a skipped step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradfn.weighting as W
from gradfn import SonGokuScheduler, TaskSpec
from gradfn.algorithms import songoku
from tests._utils.asserts import tree_equal

K, D = 4, 5


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(K, D, D, generator=g, dtype=torch.float64)
    scale = torch.tensor([0.01, 0.1, 1.0, 0.3], dtype=torch.float64)  # losses of other scales

    def loss_fn(params, batch):
        w = params["w"]
        return torch.stack(
            [
                scale[k]
                * (0.5 * ((a[k] @ w - batch[k]) ** 2).sum() + 0.5 * (params[f"h{k}"] ** 2).sum())
                for k in range(K)
            ]
        )

    params = {"w": torch.randn(D, generator=g, dtype=torch.float64)}
    params.update({f"h{k}": torch.randn(2, generator=g, dtype=torch.float64) for k in range(K)})
    data = [torch.randn(K, D, generator=g, dtype=torch.float64) for _ in range(8)]
    return loss_fn, params, data


def _dwa_oracle(history: list[torch.Tensor], temperature: float = 2.0) -> torch.Tensor:
    """Liu et al. 2019, Eq. 7, from the last two recorded loss vectors."""
    if len(history) < 2:
        return torch.ones(K, dtype=torch.float64)
    r = history[-1] / history[-2]
    e = torch.exp(r / temperature)
    return K * e / e.sum()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("ema_mode", ["active", "refresh"])
def test_dwa_in_the_group_matches_a_hand_written_loop(reduction, ema_mode):
    loss_fn, params, data = _problem()
    tx = songoku(
        loss_fn,
        num_tasks=K,
        shared=["w"],
        refresh_period=2,
        tau_schedule=-0.5,  # a dense conflict graph: groups smaller than K
        ema_mode=ema_mode,
        reduction=reduction,
        loss_weighting=W.dwa(),
    )
    state = tx.init(params)
    history: list[torch.Tensor] = []
    sizes = set()
    for batch in data:
        w = _dwa_oracle(history)
        state, grads = tx.update(state, params, batch)
        active = state.active
        sizes.add(int(active.sum()))
        leaves = [params[n].detach().requires_grad_(True) for n in params]
        p = dict(zip(params, leaves, strict=True))
        losses = loss_fn(p, batch)
        members = [k for k in range(K) if bool(active[k])]
        wt = {k: len(members) * w[k] / sum(w[j] for j in members) for k in members}
        red = 1.0 / len(members) if reduction == "mean" else 1.0
        want = {n: torch.zeros_like(x) for n, x in params.items()}
        for k in members:
            gk = torch.autograd.grad(losses[k], leaves, allow_unused=True, retain_graph=True)
            for n, gi in zip(params, gk, strict=True):
                if gi is not None:
                    want[n] += red * wt[k] * gi
        for n in params:  # the weighting's state, so its weights, are float32
            torch.testing.assert_close(grads[n], want[n], rtol=2e-6, atol=1e-9)
        history.append(losses.detach())
        params = {n: x - 0.05 * grads[n] for n, x in params.items()}
    assert min(sizes) < K  # the weights were restricted to proper groups


def test_uniform_weights_give_the_plain_group_sum():
    loss_fn, params, data = _problem(1)
    opts = dict(num_tasks=K, shared=["w"], refresh_period=2, tau_schedule=-0.5)
    plain, weighted = songoku(loss_fn, **opts), songoku(loss_fn, **opts, loss_weighting=W.dwa())
    s0, s1 = plain.init(params), weighted.init(params)
    for batch in data[:2]:  # DWA's weights are 1 until two losses are recorded
        s0, g0 = plain.update(s0, params, batch)
        s1, g1 = weighted.update(s1, params, batch)
        assert tree_equal(g0, g1)


@pytest.mark.parametrize("donate", [False, True])
def test_a_skipped_step_leaves_the_weighting_state_as_it_was(donate):
    loss_fn, params, data = _problem(2)
    tx = songoku(loss_fn, num_tasks=K, shared=["w"], loss_weighting=W.famo(), donate_state=donate)
    state = tx.init(params)
    for batch in data[:3]:
        state, _ = tx.update(state, params, batch)
    before = state.loss_weighting
    bad = data[3].clone()
    bad[0, 0] = math.nan  # task 0 is active (one group until the first refresh)
    state, grads = tx.update(state, params, bad)
    assert bool(state.skipped)
    assert tree_equal(state.loss_weighting, before)
    assert all(bool((g == 0).all()) for g in grads.values())


def test_learned_weightings_and_gradnorm_are_refused():
    loss_fn, _, _ = _problem()
    for lw in (W.uncertainty(), W.imtl_l(), W.gradnorm()):
        with pytest.raises(ValueError, match="loss_weighting"):
            songoku(loss_fn, num_tasks=K, loss_weighting=lw)
    with pytest.raises(TypeError, match="loss_weighting"):
        songoku(loss_fn, num_tasks=K, loss_weighting="dwa")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(3, 6)
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = torch.tanh(self.trunk(x))
        return [head(h).squeeze(-1) for head in self.heads]


def _task_loss(k: int):
    return lambda m, b: ((m(b[0])[k] - b[1][:, k]) ** 2).mean()


def _scheduler(seed: int):
    torch.manual_seed(seed)
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tasks = [TaskSpec(f"t{k}", _task_loss(k)) for k in range(3)]
    return model, opt, SonGokuScheduler(model, tasks, opt, refresh_period=2, loss_weighting=W.dwa())


def test_scheduler_checkpoint_round_trip_keeps_the_weighting_state():
    g = torch.Generator().manual_seed(0)
    xs = [(torch.randn(16, 3, generator=g), torch.randn(16, 3, generator=g)) for _ in range(6)]
    model, opt, sched = _scheduler(0)
    for b in xs[:3]:
        sched.step({f"t{k}": b for k in range(3)})
    saved = (model.state_dict(), opt.state_dict(), sched.state_dict())
    assert saved[2]["core"]["loss_weighting"]["count"] == 3
    model2, opt2, sched2 = _scheduler(1)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    assert tree_equal(sched2.state.loss_weighting, sched.state.loss_weighting)
    for b in xs[3:]:
        sched.step({f"t{k}": b for k in range(3)})
        sched2.step({f"t{k}": b for k in range(3)})
    assert tree_equal(sched2.state, sched.state)
    # a scheduler without a weighting refuses the checkpoint
    plain = SonGokuScheduler(_Net(), sched.tasks, None, refresh_period=2)
    with pytest.raises(ValueError, match="loss_weighting"):
        plain.load_state_dict(saved[2])


def test_the_weighting_sees_the_losses_averaged_across_ranks():
    """With a sketch the gradients are reduced late; the weighting still sees reduced losses."""
    import optree

    loss_fn, params, data = _problem(3)

    def reduce(tree):  # stands for an average with a rank whose values are three times ours
        return optree.tree_map(lambda x: 2 * x if x.is_floating_point() else x, tree)

    tx = songoku(
        loss_fn, num_tasks=K, shared=["w"], sketch_dim=8, loss_weighting=W.dwa(), reduce=reduce
    )
    state = tx.init(params)
    state, _ = tx.update(state, params, data[0])
    torch.testing.assert_close(state.loss_weighting.last, 2 * loss_fn(params, data[0]).float())
