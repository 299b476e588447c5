"""Ranks built with different settings fail at construction, on every rank, naming the field
(2 gloo processes over loopback; one spawn runs every scenario)."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from gradfn.adapters import GradientConductor, SonGokuScheduler, TaskSpec
from gradfn.integrations.distributed import check_same_config
from tests._utils.two_ranks import run_two_ranks


def _outcome(fn) -> str:
    try:
        fn()
    except ValueError as err:
        return f"ValueError: {err}"
    return "ok"


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=20))
    try:
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        names = ["a", "b"] if rank == 0 else ["b", "a"]  # swapped task names on rank 1
        specs = [TaskSpec(n, lambda m, b, i=i: m(b)[:, i].sum()) for i, n in enumerate("ab")]
        swapped = [TaskSpec(n, s.loss_fn) for n, s in zip(names, specs, strict=True)]
        losses = {"a": lambda out, y: out[:, 0].sum(), "b": lambda out, y: out[:, 1].sum()}
        out = {
            "same": _outcome(lambda: check_same_config({"x": 1, "f": _outcome})),
            "plain": _outcome(lambda: check_same_config({"x": rank, "y": 2}, what="t")),
            "songoku_ok": _outcome(lambda: SonGokuScheduler(model, specs, refresh_period=8)),
            "songoku_period": _outcome(
                lambda: SonGokuScheduler(model, specs, refresh_period=8 + 8 * rank)
            ),
            "songoku_names": _outcome(lambda: SonGokuScheduler(model, swapped)),
            "songoku_sync": _outcome(
                lambda: SonGokuScheduler(model, specs, ddp_sync=("avg", "none")[rank])
            ),
            "gcond_ok": _outcome(lambda: GradientConductor(model, losses, {"a": 1.0, "b": 1.0}, 2)),
            "gcond_eps": _outcome(
                lambda: GradientConductor(
                    model, losses, {"a": 1.0, "b": 1.0}, 2, eps=(1e-8, 1e-6)[rank]
                )
            ),
        }
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_a_setting_that_differs_between_ranks_raises_on_every_rank_naming_it():
    results = run_two_ranks(_worker)
    for r in results:
        assert r["same"] == "ok" and r["songoku_ok"] == "ok" and r["gcond_ok"] == "ok", r
        assert r["plain"].startswith("ValueError: t:") and "['x']" in r["plain"], r
        assert "['refresh_period']" in r["songoku_period"], r
        assert "['task_names']" in r["songoku_names"], r
        assert "['ddp_sync']" in r["songoku_sync"], r
        assert "['eps']" in r["gcond_eps"], r
