"""A NaN that does not enter the step's gradient does not skip it: a loss of weight 0 in
SON-GOKU's one-backward path, a loss GCond's stochastic mode does not train on that micro-batch
(losses given as separate tensors; docs: Reliability, Non-finite values)."""

from __future__ import annotations

import torch

from gradfn.algorithms import conductor, songoku
from gradfn.schedules import TauSchedule
from tests._utils.asserts import tree_equal

PARAMS = {
    "w": torch.tensor([0.3, -0.7, 1.1]),
    "a": torch.tensor([0.5, 0.2, -0.4]),
    "b": torch.tensor([-0.6, 0.9, 0.1]),
}
X = torch.tensor([1.0, -2.0, 0.5])
ONE, NAN = torch.tensor(1.0), torch.tensor(float("nan"))


def two_losses(params: dict, batch: tuple) -> list[torch.Tensor]:
    """A shared ``w`` and a head each; ``(x, y_a, y_b)``: a NaN label poisons one loss."""
    x, ya, yb = batch
    h = torch.tanh(params["w"] * x)
    return [((h * params["a"]).sum() - ya) ** 2, ((h * params["b"]).sum() - yb) ** 2]


def test_songoku_refresh_mode_ignores_a_nan_loss_of_weight_zero():
    tau = TauSchedule("constant", tau_target=-1.0)  # after the refresh: each task alone
    tx = songoku(two_losses, num_tasks=2, ema_mode="refresh", refresh_period=2, tau_schedule=tau)
    state = tx.init(PARAMS)
    for _ in range(2):
        state, _ = tx.update(state, PARAMS, (X, ONE, ONE))
    assert int(state.num_groups) == 2 and int(state.group_index) == 0  # task 0 alone runs next
    clean_state, clean = tx.update(state, PARAMS, (X, ONE, ONE))  # the state is not donated
    new, grads = tx.update(state, PARAMS, (X, ONE, NAN))
    assert not bool(new.skipped)
    assert tree_equal(grads, clean)  # task 1's NaN reached nothing
    assert int(new.step) == int(clean_state.step) == 3


def test_gcond_stochastic_ignores_a_nan_of_a_loss_not_trained_on_the_micro_batch():
    init, update = conductor(two_losses, [1.0, 1.0], accumulation_steps=2)  # stochastic
    _, clean = update(init(PARAMS), PARAMS, [(X, ONE, ONE), (X, ONE, ONE)])
    state, grads = update(init(PARAMS), PARAMS, [(X, ONE, NAN), (X, NAN, ONE)])
    assert not bool(state.skipped)
    assert tree_equal(grads, clean)
