"""The quality benchmark's protocol pieces: untouched SON-GOKU heads, validation splits, the
learning-rate selection, paired intervals, wins/ties/losses and Δm %."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.quality.methods import MethodConfig, build_method  # noqa: E402
from benchmarks.quality.problems import build_problem  # noqa: E402


def test_songoku_stepper_leaves_inactive_heads_without_gradient():
    problem = build_problem("planted_k6", 0)
    stepper = build_method("songoku", problem, 0, MethodConfig(refresh_period=4))
    params = {n: p.clone() for n, p in problem.params.items()}
    opt = torch.optim.Adam(list(params.values()), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    partial = 0
    for _ in range(16):
        before = {n: p.detach().clone() for n, p in params.items()}
        grads = stepper(params, problem.sample(gen))
        active = stepper.trace["active"][-1]
        partial += not all(active)
        for n, p in params.items():
            p.grad = grads[n]
        opt.step()
        for k, on in enumerate(active):
            for leaf in ("weight", "bias"):
                name = f"heads.{k}.{leaf}"
                assert (grads[name] is not None) == on
                assert torch.equal(before[name], params[name]) == (not on)
        assert all(grads[n] is not None for n in params if n.startswith("trunk."))
    assert partial > 0  # the colouring split the tasks at least once
