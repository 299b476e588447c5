"""FAMO (arXiv:2306.03792, Algorithm 1) against its update written with torch's own Adam and
autograd, as the official implementation does, on a small regression problem."""

from __future__ import annotations

import pytest
import torch

import gradfn.weighting as W


class _Reference:
    """FAMO's logits trained by ``torch.optim.Adam(weight_decay=gamma)`` on the gradient
    ``∂softmax(ξ)/∂ξ`` applied to the log-loss decrease."""

    def __init__(self, k: int, lr: float, gamma: float) -> None:
        self.xi = torch.zeros(k, dtype=torch.float64, requires_grad=True)
        self.opt = torch.optim.Adam([self.xi], lr=lr, weight_decay=gamma)

    def loss(self, losses: torch.Tensor) -> torch.Tensor:
        self.prev = losses.detach()
        z = torch.softmax(self.xi.detach(), 0)
        d = losses + 1e-8
        return (d.log() * z / (z / d.detach()).sum()).sum()

    def update(self, new: torch.Tensor) -> None:
        delta = (self.prev + 1e-8).log() - (new + 1e-8).log()
        with torch.enable_grad():
            (g,) = torch.autograd.grad(torch.softmax(self.xi, 0), self.xi, grad_outputs=delta)
        self.opt.zero_grad()
        self.xi.grad = g
        self.opt.step()


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64)
    y = torch.randn(64, 3, generator=g, dtype=torch.float64) * torch.tensor(
        [0.1, 1.0, 10.0], dtype=torch.float64
    )
    return x, y


@pytest.mark.parametrize("exact", [True, False])
def test_famo_matches_the_reference_over_a_training_run(exact):
    x, y = _problem()
    models = [torch.nn.Linear(5, 3).double() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    ref = _Reference(3, lr=0.1, gamma=0.01)
    famo = W.famo(lr=0.1, gamma=0.01)
    state = W.famo_init(3, dtype=torch.float64)
    for _ in range(8):
        for opt in opts:
            opt.zero_grad()
        losses = [((m(x) - y) ** 2).mean(0) for m in models]
        if exact:
            state, w = W.famo_weights(state, losses[0])
        else:
            state, w = famo.update(state, losses[0])
            if hasattr(ref, "prev"):  # the next batch's losses stand for L'
                ref.update(losses[1].detach())
        (w * losses[0]).sum().backward()
        ref.loss(losses[1]).backward()
        for opt in opts:
            opt.step()
        if exact:
            with torch.no_grad():
                state = W.famo_update_logits(
                    state, ((models[0](x) - y) ** 2).mean(0), lr=0.1, gamma=0.01
                )
                ref.update(((models[1](x) - y) ** 2).mean(0))
        torch.testing.assert_close(models[0].weight, models[1].weight)
        torch.testing.assert_close(state.logits, ref.xi.detach())
    assert float(state.logits.abs().max()) > 1e-3  # the logits did move


def test_famo_weights_by_hand_and_k1():
    state = W.famo_init(2)._replace(logits=torch.tensor([0.0, 1.0]))
    losses = torch.tensor([2.0, 0.5])
    state, w = W.famo_weights(state, losses)
    z = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    d = losses + 1e-8
    torch.testing.assert_close(w, z / d / (z / d).sum())
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))  # Σ z_k/(c D_k) = c/c
    assert bool(state.has_prev)
    f = W.famo()
    s1, w1 = f.update(f.init(1), torch.tensor([3.0]))
    s1, w1 = f.update(s1, torch.tensor([2.0]))
    torch.testing.assert_close(w1, torch.ones(1))


def test_famo_nonfinite_losses_leave_the_logits():
    f = W.famo()
    state, _ = f.update(f.init(2), torch.tensor([1.0, 2.0]))
    state, _ = f.update(state, torch.tensor([0.5, 1.0]))
    new, w = f.update(state, torch.tensor([float("nan"), 1.0]))
    for name in ("logits", "exp_avg", "exp_avg_sq", "step", "prev"):
        torch.testing.assert_close(getattr(new, name), getattr(state, name))
    assert bool(torch.isfinite(w).all()) and bool(new.has_prev)
    with pytest.raises(ValueError, match="lr"):
        W.famo(lr=-1.0)
