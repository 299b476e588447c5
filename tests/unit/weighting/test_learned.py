"""Uncertainty weighting (arXiv:1705.07115, Eqs. 7, 10) and IMTL-L (Liu et al. 2021): the loss
by hand, the optimum the papers derive, and training the parameter with the user's optimizer."""

from __future__ import annotations

import math

import pytest
import torch

import gradfn.weighting as W


@pytest.mark.parametrize(
    ("kind", "c", "d"),
    [("simplified", 1.0, 1.0), ("regression", 0.5, 0.5), ("classification", 1.0, 0.5)],
)
def test_uncertainty_loss_by_hand(kind, c, d):
    u = W.uncertainty(kind=kind)
    s = torch.tensor([0.3, -0.7], requires_grad=True)
    losses = torch.tensor([2.0, 5.0])
    _, total, w = W.weighted_loss(u, u.init(2), losses, s)
    want = sum(
        c * math.exp(-sv) * lv + d * sv for sv, lv in zip([0.3, -0.7], [2.0, 5.0], strict=True)
    )
    assert math.isclose(float(total.detach()), want, rel_tol=1e-6)
    torch.testing.assert_close(w.detach(), c * torch.exp(-s.detach()))
    total.backward()  # ∂/∂s_k = −c e^{−s_k} L_k + d
    torch.testing.assert_close(s.grad, -c * torch.exp(-s.detach()) * losses + d)


def test_imtl_l_loss_by_hand():
    m = W.imtl_l()
    s = m.init_params(2)
    losses = torch.tensor([2.0, 0.1])
    _, total, w = W.weighted_loss(m, m.init(2), losses, s)
    assert math.isclose(float(total.detach()), 2.1, rel_tol=1e-6)  # e^0 L − 0
    torch.testing.assert_close(w.detach(), torch.ones(2))
    total.backward()
    torch.testing.assert_close(s.grad, losses - 1.0)  # ∂/∂s = e^s L − 1


@pytest.mark.parametrize(
    ("method", "kind", "optimum", "level"),
    [
        ("uncertainty", "simplified", lambda L: torch.log(L), 1.0),
        ("uncertainty", "regression", lambda L: torch.log(L), 0.5),
        ("uncertainty", "classification", lambda L: torch.log(2 * L), 0.5),
        ("imtl_l", None, lambda L: -torch.log(L), 1.0),
    ],
)
def test_the_stationary_point_equalises_the_weighted_losses_across_scales(
    method, kind, optimum, level
):
    """Kendall Eqs. 7, 10 / IMTL-L: where ∂/∂s_k = 0 (s_k by hand), w_k L_k is one constant."""
    m = W.uncertainty(kind=kind) if kind else W.imtl_l()
    losses = torch.tensor([1e-3, 1.0, 1e3], dtype=torch.float64)
    s = optimum(losses).requires_grad_(True)
    _, total, w = W.weighted_loss(m, m.init(3), losses, s)
    (g,) = torch.autograd.grad(total, s)
    torch.testing.assert_close(g, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(w.detach() * losses, torch.full((3,), level, dtype=torch.float64))


def test_weighted_loss_backpropagates_the_weighted_sum_into_the_model():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    wl = W.WeightedLoss(W.uncertainty(kind="regression"), 2)
    opt = torch.optim.SGD([*model.parameters(), *wl.parameters()], lr=0.1)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    losses = ((model(x) - y) ** 2).mean(0)
    opt.zero_grad()
    wl(list(losses.unbind(0))).backward()
    w = 0.5 * torch.exp(torch.tensor([0.0, 0.0]))
    ref = torch.autograd.grad((w * ((model(x) - y) ** 2).mean(0)).sum(), model.weight)[0]
    torch.testing.assert_close(model.weight.grad, ref)
    before = wl.s.detach().clone()
    opt.step()
    assert not torch.equal(before, wl.s.detach())
    k1 = W.WeightedLoss(W.imtl_l(), 1)
    assert torch.isfinite(k1(torch.tensor([0.5])))


def test_learned_weightings_check_their_parameter():
    u = W.uncertainty()
    with pytest.raises(TypeError, match="params"):
        u.update(u.init(2), torch.ones(2), None)
    with pytest.raises(ValueError, match="params"):
        u.update(u.init(2), torch.ones(2), torch.zeros(3))
    with pytest.raises(ValueError, match="kind"):
        W.uncertainty(kind="gaussian")


def test_imtl_l_is_uncertainty_with_the_sign_of_s_flipped_under_adam():
    # e^{s}L - s is e^{-s'}L + s' with s' = -s; Adam's step is odd in the gradient, so the
    # two trainings stay bit-identical from s = 0 (the docs' weighting page says so)
    def train(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        lw = W.weighting(name)
        state = lw.init(2)
        s = lw.init_params(2).detach().requires_grad_(True)
        opt = torch.optim.Adam([*model.parameters(), s], lr=0.05)
        x, y = torch.randn(16, 3), torch.randn(16, 2) * torch.tensor([100.0, 0.01])
        for _ in range(20):
            out = model(x)
            losses = [((out[:, k] - y[:, k]) ** 2).mean() for k in range(2)]
            state, total, _ = W.weighted_loss(lw, state, losses, s)
            opt.zero_grad()
            total.backward()
            opt.step()
        return model.weight.detach(), s.detach()

    (w_u, s_u), (w_i, s_i) = train("uncertainty"), train("imtl_l")
    assert torch.equal(w_u, w_i) and torch.equal(s_u, -s_i)
    assert not torch.equal(s_u, torch.zeros(2))  # s moved
