"""GradNorm's norms at an ``nn.Linear`` from its calls (``LinearCapture``: output gradients and
inputs, no weight gradient) against ``autograd.grad`` to its parameters, a hand-derived case,
and every case where the exact path must serve instead."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import gradfn.weighting as W

D = torch.float64


def _net(n: int, d_in: int, d_out: int, k: int, bias: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(d_in, d_out, bias=bias).to(D)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=D))
    x = torch.randn(n, d_in, generator=g, dtype=D)
    heads = torch.randn(k, d_out, 3, generator=g, dtype=D)
    y = torch.randn(k, n, 3, generator=g, dtype=D)
    scale = torch.logspace(-1, 1, k, dtype=D)

    def losses() -> list[torch.Tensor]:
        h = torch.tanh(layer(x))
        return [s * ((h @ a - t) ** 2).mean() for s, a, t in zip(scale, heads, y, strict=True)]

    return layer, losses


# (N, in, out): N < in (the Gramians), N > in (‖Δᵀ X‖ directly), N = 1
SHAPES = [(3, 11, 8), (6, 20, 4), (17, 5, 6), (1, 4, 2)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_norms_from_the_calls_equal_the_parameters_gradient_norms(shape, bias, k):
    layer, losses = _net(*shape, k, bias, seed=sum(shape) + k)
    capture = W.LinearCapture(layer)
    for stacked in (False, True):
        ls = losses()
        exact = W.layer_grad_norms(ls, list(layer.parameters()))
        got = W.layer_grad_norms(torch.stack(ls) if stacked else ls, capture)
        torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-12)
        assert capture.calls == [] and not capture.disabled
    # the norms alone, without the first-read comparison with the exact path
    ls = losses()
    calls = capture.take()
    assert calls is not None
    from gradfn.weighting._linear_norms import linear_grad_norms

    torch.testing.assert_close(
        linear_grad_norms(ls, layer, calls), W.layer_grad_norms(ls, list(layer.parameters()))
    )


def test_a_hand_derived_case():
    # Y = X wᵀ + c, X = [[1, 2], [3, 4]], w = [1, 0], c = 0: Y = [1, 3]
    layer = nn.Linear(2, 1).to(D)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0]]))
        layer.bias.zero_()
    capture = W.LinearCapture(layer)
    out = layer(torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=D))[:, 0]
    # L1 = ΣY: Δ = 1, ∇w = [1+3, 2+4], ∇c = 2 → 16 + 36 + 4
    # L2 = ½ΣY²: Δ = Y, ∇w = 1·[1, 2] + 3·[3, 4] = [10, 14], ∇c = 4 → 100 + 196 + 16
    got = W.layer_grad_norms([out.sum(), 0.5 * (out**2).sum()], capture)
    torch.testing.assert_close(got, torch.tensor([56.0, 312.0], dtype=D).sqrt())


def test_several_calls_batched_inputs_and_a_call_off_the_losses():
    layer = nn.Linear(6, 4).to(D)
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 5, 6, generator=g, dtype=D)  # (B, T, in)
    b = torch.randn(3, 6, generator=g, dtype=D)
    capture = W.LinearCapture(layer)
    layer(b)  # recorded, but does not reach the losses
    with torch.no_grad():
        layer(b)  # not recorded
    h = torch.cat([layer(a).flatten(0, 1), layer(layer(b).tanh()[:, :0].sum() + b)])
    ls = [h.pow(2).mean(), h[:, 0].sin().sum(), (h * 0).sum().detach()]
    assert len(capture.calls) == 4
    got = W.layer_grad_norms(ls, capture)
    want = W.layer_grad_norms(ls, layer)
    torch.testing.assert_close(got, want)
    assert float(got[2]) == 0.0


def test_frozen_weight_and_the_steps_of_weighted_loss():
    layer, losses = _net(9, 5, 4, 3, True, seed=7)
    layer.weight.requires_grad_(False)  # the norms of the bias gradient alone
    ls = losses()
    torch.testing.assert_close(
        W.layer_grad_norms(ls, W.LinearCapture(layer)), W.layer_grad_norms(ls, layer.bias)
    )
    layer.weight.requires_grad_(True)
    fast = W.WeightedLoss(W.gradnorm(lr=0.1), 3, layer=layer)
    exact = W.WeightedLoss(W.gradnorm(lr=0.1), 3, layer=list(layer.parameters()))
    assert isinstance(fast.capture, W.LinearCapture) and exact.capture is None
    for _ in range(4):
        ls = losses()
        fast(ls)
        exact(ls)
        assert fast.capture.calls == []
        for x, y in zip(fast.state, exact.state, strict=True):
            torch.testing.assert_close(x, y)
    assert not torch.allclose(fast.state.weights, torch.ones(3))
    assert len(layer._forward_hooks) == 1  # the first capture is gone, its hook with it


def test_the_exact_path_serves_where_the_calls_cannot():
    layer, losses = _net(6, 4, 3, 2, True, seed=5)
    capture = W.LinearCapture(layer, max_calls=2)
    ls = losses()
    want = W.layer_grad_norms(ls, layer)
    assert capture.take() is not None  # recorded, then forgotten
    torch.testing.assert_close(W.layer_grad_norms(ls, capture), want)  # no call: exact
    for _ in range(3):
        ls = losses()  # three calls > max_calls: none kept, exact
    assert capture.calls == [] and capture.overflow
    torch.testing.assert_close(W.layer_grad_norms(ls, capture), W.layer_grad_norms(ls, layer))
    x = torch.randn(5, 4, dtype=D)
    ls = [layer(x).sum()]
    x.add_(1.0)  # the recorded input changed in place
    assert capture.take() is None
    capture.remove()
    layer(x)
    assert capture.calls == []


def test_a_weight_used_outside_the_layer_call_warns_and_keeps_the_exact_path():
    layer, _ = _net(6, 4, 4, 2, False, seed=2)
    capture = W.LinearCapture(layer)
    x = torch.randn(6, 4, dtype=D)

    def tied() -> list[torch.Tensor]:
        h = layer(x)
        h2 = nn.functional.linear(h, layer.weight)  # the same weight, not through layer(...)
        return [h2.pow(2).sum(), h2.sum()]

    ls = tied()
    with pytest.warns(UserWarning, match="differ"):
        got = W.layer_grad_norms(ls, capture)
    torch.testing.assert_close(got, W.layer_grad_norms(ls, layer))
    assert capture.disabled
    ls = tied()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(W.layer_grad_norms(ls, capture), W.layer_grad_norms(ls, layer))


def test_other_layers_take_the_exact_path_and_bad_input():
    conv = nn.Conv1d(2, 3, 1)
    assert W.WeightedLoss(W.gradnorm(), 2, layer=conv).capture is None
    assert W.WeightedLoss(W.dwa(), 2, layer=nn.Linear(2, 2)).capture is None
    with pytest.raises(TypeError, match="layer"):
        W.LinearCapture(conv)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_calls"):
        W.LinearCapture(nn.Linear(2, 2), max_calls=0)


def test_a_model_with_a_capture_pickles_and_copies():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    wl = W.WeightedLoss(W.gradnorm(), 2, layer=model[0])
    x = torch.randn(5, 4)
    buf = io.BytesIO()
    torch.save(model, buf)  # the hook goes along, inert
    buf.seek(0)
    torch.load(buf, weights_only=False)(x)
    assert wl.capture is not None and wl.capture.calls == []
    model2, wl2 = copy.deepcopy((model, wl))  # the copy records its own layer's calls
    out = model2(x)
    assert wl2.capture is not None and len(wl2.capture.calls) == 1 and wl.capture.calls == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wl2([out[:, 0].pow(2).mean(), out[:, 1].abs().mean()]).backward()
    assert wl2.capture.checked and not wl2.capture.disabled


def test_weighted_loss_does_not_own_the_models_layer():
    # the layer's parameters reach the optimizer and the checkpoint through the model only
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    wl = W.WeightedLoss(W.gradnorm(), 2, layer=model[0])
    assert wl.layer is model[0]
    assert list(wl.parameters()) == []
    assert not any(k.startswith("layer") for k in wl.state_dict())
    opt = torch.optim.SGD([*model.parameters(), *wl.parameters()], lr=0.1)
    assert len(opt.param_groups[0]["params"]) == 2  # no duplicates
