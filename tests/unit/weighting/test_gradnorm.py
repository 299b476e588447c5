"""GradNorm (arXiv:1711.02257, Algorithm 1) at one layer: the norms and the weight update by
hand on a linear model, and the properties the paper states (Σ w = K, α = 0 equalises)."""

from __future__ import annotations

import pytest
import torch

import gradfn.weighting as W


def _model(k: int = 3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    y = torch.randn(16, k, generator=g, dtype=torch.float64) * torch.tensor(
        [0.1, 1.0, 5.0][:k], dtype=torch.float64
    )
    layer = torch.nn.Linear(4, 5, bias=False).double()
    scale = torch.tensor([0.2, 1.0, 3.0][:k], dtype=torch.float64)[:, None]
    heads = (torch.randn(k, 5, generator=g, dtype=torch.float64) * scale).requires_grad_(True)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(5, 4, generator=g, dtype=torch.float64))

    def losses():
        out = layer(x) @ heads.T  # (16, K)
        return [((out[:, i] - y[:, i]) ** 2).mean() for i in range(k)]

    def norms():  # ‖∇_W L_k‖ = ‖a_k‖ · ‖Xᵀ r_k‖ · 2/N for f = X Wᵀ, L_k = mean((f a_k − y_k)²)
        with torch.no_grad():
            r = layer(x) @ heads.T - y
            return torch.stack(
                [heads[i].norm() * (x.T @ r[:, i]).norm() * 2 / 16 for i in range(k)]
            )

    return layer, heads, losses, norms


def test_layer_norms_and_three_steps_against_adam_on_a_leaf():
    layer, heads, losses, norms = _model()
    ls, n = losses(), norms()
    torch.testing.assert_close(W.layer_grad_norms(ls, layer), n)
    gn = W.gradnorm(alpha=1.5, lr=0.05)
    state = W.gradnorm_init(3, dtype=torch.float64)
    # the oracle: w a leaf trained by torch.optim.Adam on ∂L_grad/∂w, renormalised in place
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05)
    l0 = None
    for step in range(3):
        ls, n = losses(), norms()
        values = torch.stack([x.detach() for x in ls])
        l0 = values if l0 is None else l0
        state, got = gn.update(state, ls, layer if step % 2 else layer.weight)
        torch.testing.assert_close(got, w.detach())
        ratio = values / l0
        big_g = w.detach() * n
        target = big_g.mean() * (ratio / ratio.mean()) ** 1.5  # Eq. 2, held constant
        w.grad = torch.sign(big_g - target) * n
        opt.step()
        with torch.no_grad():
            w.mul_(3 / w.sum())
        torch.testing.assert_close(state.weights, w.detach())
        with torch.no_grad():
            heads.mul_(0.7)


def test_alpha_zero_equalises_the_weighted_gradient_norms():
    layer, _, losses, norms = _model()
    ls, n = losses(), norms()
    gn = W.gradnorm(alpha=0.0, lr=0.01)
    state = gn.init(3, device="cpu")._replace(weights=torch.ones(3, dtype=torch.float64))
    for _ in range(300):
        state, w = gn.update(state, ls, layer)
        assert bool((w > 0).all()) and torch.isclose(
            w.sum(), torch.tensor(3.0, dtype=torch.float64)
        )
    big_g = state.weights * n
    assert float(big_g.max() / big_g.min()) < 1.15
    assert float(n.max() / n.min()) > 3  # far from equal before


def test_nonfinite_losses_leave_the_state_and_k1():
    layer, _, losses, _ = _model()
    gn = W.gradnorm()
    state, _ = gn.update(gn.init(3), losses(), layer)
    bad = losses()
    bad[0] = bad[0] * float("nan")
    new, w = gn.update(state, bad, layer)
    for x, y in zip(new, state, strict=True):
        torch.testing.assert_close(x, y)
    torch.testing.assert_close(w, state.weights)
    layer1, _, losses1, _ = _model(1)
    s1 = gn.init(1)
    for _ in range(3):
        s1, w1 = gn.update(s1, losses1(), layer1)
        torch.testing.assert_close(w1, torch.ones(1))


def test_in_a_training_loop_and_checks():
    layer, heads, losses, _ = _model()
    wl = W.WeightedLoss(W.gradnorm(), 3, layer=layer)
    opt = torch.optim.SGD([*layer.parameters(), heads], lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        wl(losses()).backward()
        opt.step()
    assert torch.isclose(wl.weights.sum(), torch.tensor(3.0))
    with pytest.raises(TypeError, match="params"):
        W.gradnorm().update(W.gradnorm().init(3), losses(), None)
    with pytest.raises(ValueError, match="alpha"):
        W.gradnorm(alpha=-1.0)


def test_stacked_losses_and_shared_features_give_the_same_norms():
    layer, heads, _, _ = _model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    y = torch.randn(16, 3, generator=g, dtype=torch.float64)
    h = layer(x)
    ls = [((h @ heads[i] - y[:, i]) ** 2).mean() for i in range(3)]
    by_list = W.layer_grad_norms(ls, layer)
    torch.testing.assert_close(W.layer_grad_norms(torch.stack(ls), layer), by_list)
    # at the features h: ‖∂L_k/∂h‖ = ‖(2/N) r_k a_kᵀ‖ = (2/N) ‖r_k‖ ‖a_k‖
    with torch.no_grad():
        r = h @ heads.T - y
        want = torch.stack([2 / 16 * r[:, i].norm() * heads[i].norm() for i in range(3)])
    torch.testing.assert_close(W.layer_grad_norms(ls, h), want)
