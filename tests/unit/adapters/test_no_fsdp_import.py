"""The adapters and ``aggregators.backward`` check for FSDP2-sharded models without importing
``torch.distributed.fsdp`` / ``torch.distributed.tensor`` into a process that never used them:
on torch 2.13, that import in a gloo process makes the exit abort now and then (SIGABRT in
gloo's teardown after ``destroy_process_group``)."""

from __future__ import annotations

import subprocess
import sys

_SCRIPT = """
import sys
import torch
from torch import nn
from gradfn import aggregators
from gradfn.adapters import GradientConductor, SonGokuScheduler, TaskSpec

model = nn.Linear(3, 2)
specs = [TaskSpec(n, lambda m, b, i=i: m(b)[:, i].sum()) for i, n in enumerate("ab")]
SonGokuScheduler(model, specs, refresh_period=8)
losses = {"a": lambda out, y: out[:, 0].sum(), "b": lambda out, y: out[:, 1].sum()}
GradientConductor(model, losses, {"a": 1.0, "b": 1.0}, 2)
out = model(torch.randn(4, 3))
aggregators.backward([out[:, 0].sum(), out[:, 1].sum()], model, "upgrad")
print(sorted(m for m in ("torch.distributed.fsdp", "torch.distributed.tensor") if m in sys.modules))
"""


def test_checking_for_sharded_models_imports_no_fsdp_module():
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
