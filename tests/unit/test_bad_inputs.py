"""Bad input at the entry points fails at once with a ValueError or TypeError that names the
argument (a backquoted name in the message), never deep inside with an unrelated error; numpy
scalars are accepted wherever a number is."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gradfn.aggregators as A
from gradfn import per_task_grads
from gradfn.algorithms import ConductorConfig, SonGokuConfig
from gradfn.schedules import TauSchedule

NAMED = re.compile(r"`\w+")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def _losses(m: nn.Module) -> torch.Tensor:
    out = m(torch.randn(4, 3))
    return out.pow(2).mean(0)  # (K,) = (2,)


def _backward(losses: Any = None, params: Any = None, agg: Any = "upgrad", **kw: Any) -> Any:
    m = _model()
    return A.backward(
        _losses(m) if losses is None else losses(m) if callable(losses) else losses,
        m if params is None else params,
        agg,
        **kw,
    )


J = torch.randn(3, 5)
BAD: dict[str, Callable[[], Any]] = {
    "backward: (3, 32) loss tensor": lambda: _backward(
        lambda m: m(torch.randn(32, 3)).T.repeat(2, 1)[:3]
    ),
    "backward: per-sample losses": lambda: _backward(lambda m: m(torch.randn(8, 3)).pow(2)),
    "backward: empty losses": lambda: _backward([]),
    "backward: K = 0 tensor": lambda: _backward(torch.zeros(0)),
    "backward: int loss": lambda: _backward([torch.tensor(1), torch.tensor(2)]),
    "backward: float loss": lambda: _backward([1.0, 2.0]),
    "backward: string losses": lambda: _backward("ab"),
    "backward: params a tensor": lambda: _backward(params=torch.zeros(3)),
    "backward: no trainable params": lambda: _backward(params=[torch.zeros(3)]),
    "backward: unknown method": lambda: _backward(agg="nope"),
    "backward: unknown hyper-parameter": lambda: _backward(agg="upgrad", nope=1),
    "backward: shared not in params": lambda: _backward(shared=[nn.Parameter(torch.ones(2))]),
    "backward: features without grad": lambda: _backward(features=torch.zeros(2)),
    "aggregate: list of task gradients": lambda: A.upgrad([J[0], J[1], J[2]]),
    "aggregate: int gradients": lambda: A.upgrad({"w": torch.ones(3, 5, dtype=torch.int64)}),
    "aggregate: K = 0": lambda: A.upgrad({"w": torch.zeros(0, 5)}),
    "aggregate: mismatched task axes": lambda: A.upgrad({"a": J, "b": torch.randn(2, 5)}),
    "aggregate: bad active mask": lambda: A.upgrad(
        {"w": J}, active=torch.ones(2, dtype=torch.bool)
    ),
    "aggregate: float active mask": lambda: A.mean({"w": J}, active=torch.ones(3)),
    "aggregate: pref wrong length": lambda: A.config({"w": J}, pref=torch.ones(2)),
    "weights: gram not square": lambda: A.upgrad_weights(torch.ones(3, 2)),
    "weights: gram not a tensor": lambda: A.mgda_weights([[1.0, 0.0], [0.0, 1.0]]),
    "weights: int gram": lambda: A.cagrad_weights(torch.eye(3, dtype=torch.int64)),
    "init: K = 0": lambda: A.aggregator("upgrad").init(0),
    "init: bool K": lambda: A.aggregator("gradvac").init(True),
    "per_task_grads: losses not callable": lambda: per_task_grads(3, {"w": torch.ones(2)}, None),
    "per_task_grads: params a list of floats": lambda: per_task_grads(
        lambda p, b: [p[0] * p[1]], [1.0, 2.0], None
    ),
    "per_task_grads: int params": lambda: per_task_grads(
        lambda p, b: [p["w"].sum()], {"w": torch.ones(2, dtype=torch.int64)}, None
    ),
    "config: num_tasks 0": lambda: SonGokuConfig(num_tasks=0),
    "config: lambdas empty": lambda: ConductorConfig(lambdas=(), accumulation_steps=1),
    "config: lambdas string": lambda: ConductorConfig(lambdas="ab", accumulation_steps=1),
    "tau: unknown kind": lambda: TauSchedule("sometimes"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_early_naming_the_argument(case):
    with pytest.raises((ValueError, TypeError)) as info:
        BAD[case]()
    assert NAMED.search(str(info.value)), str(info.value)


def test_a_matrix_of_losses_is_not_read_as_tasks():
    m = _model()
    per_sample = m(torch.randn(32, 3)).pow(2).T.reshape(2, 32)  # (K, batch)
    with pytest.raises(ValueError, match=r"`losses`.*\(K,\).*\(2, 32\)"):
        A.backward(per_sample, m, "mean")
    A.backward(per_sample.mean(1), m, "mean")  # reduced first: accepted


def test_numpy_scalars_are_accepted_like_python_numbers():
    a = SonGokuConfig(num_tasks=np.int64(3), ema_beta=np.float32(0.5), refresh_period=np.int64(4))
    b = SonGokuConfig(num_tasks=3, ema_beta=float(np.float32(0.5)), refresh_period=4)
    assert a == b and type(a.num_tasks) is int and type(a.ema_beta) is float
    c = ConductorConfig(lambdas=(np.float32(1.0), 0.5), accumulation_steps=np.int64(2))
    assert c == ConductorConfig(lambdas=(1.0, 0.5), accumulation_steps=2)
    assert TauSchedule("constant", tau_target=np.float64(0.2)).tau_target == 0.2
    agg = A.aggregator("upgrad", reg_eps=np.float64(1e-4))
    ref = A.aggregator("upgrad", reg_eps=1e-4)
    out = agg.update(agg.init(3), {"w": J})[1].grad["w"]
    torch.testing.assert_close(out, ref.update(ref.init(3), {"w": J})[1].grad["w"])
    with pytest.raises(ValueError, match="ema_beta"):
        SonGokuConfig(num_tasks=3, ema_beta=np.float32("nan"))
    with pytest.raises(ValueError, match="num_tasks"):
        SonGokuConfig(num_tasks=np.bool_(True))
