"""SON-GOKU with a GradNorm warm start (the SON-GOKU paper's "+ GradNorm warm start"): GradNorm
trains the first steps, then ``SonGokuScheduler`` takes over the same model and optimizer, as
the SON-GOKU guide shows."""

from __future__ import annotations

import torch
from torch import nn

import gradfn.weighting as W
from gradfn import SonGokuScheduler, TaskSpec


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 8)
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = torch.tanh(self.trunk(x))
        return [head(h).squeeze(-1) for head in self.heads]


def test_gradnorm_warm_start_then_songoku():
    torch.manual_seed(0)
    model = _Net()
    x = torch.randn(32, 4)
    y = torch.randn(32, 3) * torch.tensor([0.1, 1.0, 10.0])  # losses orders of magnitude apart
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def task_loss(k: int):
        return lambda m, batch: ((m(batch[0])[k] - batch[1][:, k]) ** 2).mean()

    warm = W.WeightedLoss(W.gradnorm(alpha=1.5, lr=0.05), 3, layer=model.trunk)
    for _ in range(5):  # the warm start: GradNorm
        opt.zero_grad()
        out = model(x)
        warm([((out[k] - y[:, k]) ** 2).mean() for k in range(3)]).backward()
        opt.step()
    w = warm.weights
    assert not torch.allclose(w, torch.ones(3)) and torch.isclose(w.sum(), torch.tensor(3.0))

    # then SON-GOKU, each task's loss scaled by the weight GradNorm ended with (optional)
    tasks = [
        TaskSpec(f"t{k}", (lambda f, c: lambda m, b: c * f(m, b))(task_loss(k), float(w[k])))
        for k in range(3)
    ]
    scheduler = SonGokuScheduler(model, tasks, opt, refresh_period=2)
    before = model.trunk.weight.detach().clone()
    for _ in range(4):
        losses = scheduler.step({f"t{k}": (x, y) for k in range(3)})
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert not torch.equal(before, model.trunk.weight)
    assert scheduler.t == 4
