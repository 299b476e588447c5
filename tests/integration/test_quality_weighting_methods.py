"""The loss-weighting baselines and FairGrad in the quality benchmark: each builds, takes a few
optimizer steps on a quick problem with finite gradients, and DWA's first step (weights 1) is
Uniform's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.quality.methods import LABELS, METHODS, MethodConfig, build_method  # noqa: E402
from benchmarks.quality.problems import build_problem  # noqa: E402
from benchmarks.quality.weighting_methods import WEIGHTING_METHODS  # noqa: E402


@pytest.fixture(scope="module")
def problem():
    return build_problem("planted_k6", 0)


@pytest.mark.parametrize("method", WEIGHTING_METHODS)
def test_weighting_method_builds_and_steps(method, problem):
    assert method in METHODS and method in LABELS
    stepper = build_method(method, problem, 0, MethodConfig())
    params = {n: p.clone() for n, p in problem.params.items()}
    start = {n: p.clone() for n, p in params.items()}
    opt = torch.optim.Adam(list(params.values()), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = stepper(params, problem.sample(gen))
        assert set(grads) == set(params)
        for n, p in params.items():
            assert grads[n] is not None and bool(torch.isfinite(grads[n]).all())
            p.grad = grads[n]
        opt.step()
    assert not torch.equal(params["trunk.0.weight"], start["trunk.0.weight"])


def test_dwa_first_step_is_uniform(problem):
    batch = problem.sample(torch.Generator().manual_seed(0))
    dwa = build_method("dwa", problem, 0)(problem.params, batch)
    uni = build_method("uniform", problem, 0)(problem.params, batch)
    for n in uni:
        torch.testing.assert_close(dwa[n], uni[n])
