"""DWA (arXiv:1803.10704, Eq. 7) and RLW (arXiv:2111.10603): hand-derived values and properties."""

from __future__ import annotations

import math

import pytest
import torch

import gradfn.weighting as W


def test_dwa_is_uniform_for_two_steps_then_eq7_by_hand():
    dwa = W.dwa(temperature=2.0)
    state = dwa.init(2)
    state, w1 = dwa.update(state, torch.tensor([1.0, 2.0]))
    state, w2 = dwa.update(state, torch.tensor([0.5, 2.0]))
    state, w3 = dwa.update(state, torch.tensor([0.25, 1.0]))
    torch.testing.assert_close(w1, torch.ones(2))
    torch.testing.assert_close(w2, torch.ones(2))
    # r = L(t-1)/L(t-2) = (0.5/1, 2/2); w = 2 e^{r/2} / Σ e^{r/2}
    e = [math.exp(0.25), math.exp(0.5)]
    torch.testing.assert_close(w3, torch.tensor([2 * e[0] / sum(e), 2 * e[1] / sum(e)]))
    _, w4 = dwa.update(state, torch.tensor([1.0, 1.0]))  # r = (0.25/0.5, 1/2): equal
    torch.testing.assert_close(w4, torch.ones(2))


def test_dwa_weights_sum_to_k_and_favour_the_slow_task():
    dwa = W.dwa(temperature=1.0)
    state = dwa.init(3)
    for losses in ([3.0, 3.0, 3.0], [1.0, 2.9, 2.0]):
        state, _ = dwa.update(state, torch.tensor(losses))
    w = W.dwa_weights(state, temperature=1.0)
    assert torch.isclose(w.sum(), torch.tensor(3.0))
    assert bool((w > 0).all()) and int(w.argmax()) == 1


def test_dwa_nonfinite_or_nonpositive_losses_leave_the_state():
    dwa = W.dwa()
    state = dwa.init(2)
    state, _ = dwa.update(state, torch.tensor([1.0, 2.0]))
    for bad in ([float("nan"), 1.0], [float("inf"), 1.0], [0.0, 1.0]):
        new, w = dwa.update(state, torch.tensor(bad))
        for x, y in zip(new, state, strict=True):
            torch.testing.assert_close(x, y)
        assert bool(torch.isfinite(w).all())


def test_dwa_per_epoch_recipe_and_k1():
    state = W.dwa_init(1)
    for loss in (2.0, 1.0, 0.5):
        state = W.dwa_observe(state, torch.tensor([loss]))
        torch.testing.assert_close(W.dwa_weights(state), torch.ones(1))


def test_rlw_weights_are_a_seeded_softmax_of_normal_draws():
    rlw = W.rlw(seed=3)
    state = rlw.init(4)
    losses = torch.ones(4)
    s1, w1 = rlw.update(state, losses)
    _, w1_again = rlw.update(state, losses)
    _, w2 = rlw.update(s1, losses)
    torch.testing.assert_close(w1, w1_again)
    assert not torch.allclose(w1, w2)
    for w in (w1, w2):
        assert bool((w > 0).all()) and torch.isclose(w.sum(), torch.tensor(1.0))
    # log w − mean(log w) = z − mean(z): standard normal draws
    k = 20000
    z = torch.log(W.rlw_weights(torch.tensor(11), k).double())
    z = z - z.mean()
    assert abs(float(z.std()) - 1.0) < 0.03
    assert abs(float((z.abs() < 1.0).double().mean()) - 0.6827) < 0.02
    _, one = W.rlw().update(W.rlw().init(1), torch.ones(1))
    torch.testing.assert_close(one, torch.ones(1))


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="temperature"):
        W.dwa(temperature=0.0)
    with pytest.raises(ValueError, match="losses"):
        W.dwa().update(W.dwa().init(2), torch.ones(3))
    with pytest.raises(ValueError, match="tasks"):
        W.rlw().init(0)
    with pytest.raises(ValueError, match="unknown method"):
        W.weighting("nope")
