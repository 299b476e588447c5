"""Peak memory per rank of a multi-task step on an FSDP2 (``fully_shard``) MLP against ``W``.

A step is forward + the per-task differentiation + UPGrad, written into ``p.grad``, on a rank's
slice of a fixed global batch (gloo on the CPU; the ``W`` ranks are processes spawned here):

* ``fsdp per_task_backward``: :func:`gradfn.integrations.fsdp.per_task_backward` (``K``
  backward passes, the rank's ``K × n/W`` rows, one ``K × K`` all-reduce);
* ``fsdp keep_unsharded``: the same with ``keep_unsharded=True``;
* ``fsdp sum(losses).backward()``: the single-loss step, for scale;
* W = 1 without FSDP: ``aggregators.backward(..., gramian="rows")`` and ``"streaming"`` (the
  Gramian without the rows, which FSDP cannot use: it needs ``autograd.grad`` w.r.t. the
  parameters).

Each step runs once to warm up, then once under the CPU profiler, then once under a sampling
thread (``benchmarks/_cpu_memory.py``). Peak memory per rank, from the step's start (the sharded
parameters excluded, ``.grad`` set to None before), the maximum over the ranks:

* **process-wide**: glibc's ``mmap``-ed bytes sampled during the step, every block of 64 KiB or
  more ``mmap``-ed; it sees the frees that gloo's worker threads make;
* **profiler**: the running sum of the profiler's allocation events (as ``benchmarks/backward.py``);
  it misses frees made on threads it does not profile, so it over-counts at ``W ≥ 2``;
* **by address**: the same events, a block counted as freed when its address is allocated again.

The decomposition table gives the live bytes at the by-address peak by the allocating operator:
the rows (``aten::zeros``), FSDP's all-gathers (unsharded parameters), gloo's copy of each
reduce-scatter input (the full-size gradient of a unit), FSDP's reduce-scatter outputs (the
sharded gradients), the rest (activations, the update ``wᵀ J``).

Usage::

    python -m benchmarks.fsdp_memory                 # a 3.2 M-parameter MLP, K = 8, W = 1, 2, 4
    python -m benchmarks.fsdp_memory --worlds 1,2,3,4
    python -m benchmarks.fsdp_memory --quick         # a smaller MLP (smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import gradfn.aggregators as A
from benchmarks._cpu_memory import account, mmap_large_blocks, profiled_events, sampled_peak_mib
from gradfn.integrations.fsdp import per_task_backward

K = 8
KINDS = ("rows", "all-gather", "reduce-scatter copy", "sharded grads", "other")
SINGLE = "fsdp sum(losses).backward()"
PER_TASK = "fsdp per_task_backward"


def _model(width: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(64, width), nn.Tanh()]
    for _ in range(3):
        layers += [nn.Sequential(nn.Linear(width, width), nn.Tanh())]
    return nn.Sequential(*layers, nn.Linear(width, K))


def _losses(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    out = model(x)
    return [(out[:, k] - y[:, k]).pow(2).mean() for k in range(K)]


def _batch(rank: int, world: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 64, generator=g), torch.randn(64, K, generator=g)
    part = slice(rank * 64 // world, (rank + 1) * 64 // world)
    return x[part], y[part]


def _kind(names: list[str]) -> str:
    """An allocation's kind from its enclosing operators (innermost first)."""
    if any("c10d::_reduce_scatter" in n for n in names):
        return "reduce-scatter copy"
    if any("all_gather" in n or "allgather" in n for n in names):
        return "all-gather"
    if any("post_backward_reduce" in n for n in names):
        return "sharded grads"
    if "aten::zeros" in names:
        return "rows"
    return "other"


def _measure(fn: Callable[[], None], model: nn.Module) -> dict[str, Any]:
    """Warm-up, profiled and sampled runs of one step."""
    for run in range(3):
        model.zero_grad(set_to_none=True)
        if run == 0:
            fn()
        elif run == 1:
            acc = account(profiled_events(fn, _kind), keep=("sharded grads", "other"))
        else:
            sampled = sampled_peak_mib(fn)
    return {"sampled": sampled, "acc": acc._asdict()}


def _worker(rank: int, world: int, port: int, width: int, out: str) -> None:
    mmap_large_blocks()
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        model = _model(width)
        for layer in list(model)[2:-1]:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        x, y = _batch(rank, world)

        def per_task(keep: bool) -> Callable[[], None]:
            def run() -> None:
                per_task_backward(_losses(model, x, y), model, "upgrad", keep_unsharded=keep)

            return run

        def single() -> None:
            torch.stack(_losses(model, x, y)).sum().backward()

        runs = {PER_TASK: per_task(False), "fsdp keep_unsharded": per_task(True), SINGLE: single}
        res = {name: _measure(fn, model) for name, fn in runs.items()}
        shard = sum(p.to_local().numel() * 4 for p in model.parameters()) / 2**20  # type: ignore[attr-defined]
        with open(os.path.join(out, f"{world}_{rank}.json"), "w") as f:
            json.dump({"res": res, "shard": shard}, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain(width: int) -> dict[str, dict[str, Any]]:
    model = _model(width)
    x, y = _batch(0, 1)

    def rows_or_streaming(gramian: str) -> Callable[[], None]:
        def run() -> None:
            A.backward(_losses(model, x, y), model, "upgrad", gramian=gramian)

        return run

    return {
        f"no FSDP, gramian={g!r}": _measure(rows_or_streaming(g), model)
        for g in ("rows", "streaming")
    }


def _spawn(world: int, width: int) -> tuple[float, dict[str, list[dict[str, Any]]]]:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _worker,
            args=(world, _free_port(), width, out),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        ranks = []
        for r in range(world):
            with open(os.path.join(out, f"{world}_{r}.json")) as f:
                ranks.append(json.load(f))
    shard = max(r["shard"] for r in ranks)
    return shard, {name: [r["res"][name] for r in ranks] for name in ranks[0]["res"]}


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def _worlds(text: str) -> list[int]:
    try:
        worlds = [int(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"integers, got {text!r}") from None
    if not worlds or min(worlds) < 1:
        raise argparse.ArgumentTypeError(f"each W must be ≥ 1, got {text!r}")
    return worlds


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller MLP (smoke run)")
    parser.add_argument(
        "--worlds", type=_worlds, default=[1, 2, 4], help="numbers of ranks W (default: 1,2,4)"
    )
    args = parser.parse_args()
    width = 256 if args.quick else 1024
    torch.set_num_threads(1)
    mmap_large_blocks()
    model = _model(width)
    n = sum(p.numel() for p in model.parameters())
    mib = n * 4 / 2**20
    units = [sum(p.numel() for p in m.parameters()) for m in list(model)[2:-1]]
    unit = max(*units, n - sum(units)) * 4 / 2**20  # the largest FSDP unit, unsharded
    print(f"MLP 64-{width}x4-{K}: {n / 1e6:.2f} M parameters ({mib:.1f} MiB), K = {K}")
    print(f"rows K·n·4 = {K * mib:.1f} MiB; largest FSDP unit u = {unit:.1f} MiB unsharded")
    print("global batch 64; CPU, gloo; peak MiB per rank, the maximum over the ranks\n")
    cols = (
        "process-wide | predicted: rows/W + single-loss step | formula: (K+1)·n·4/W + 4u "
        "| profiler | by address"
    )
    print(f"| step | W | shard MiB | rows/W MiB | {cols} | unseen frees MiB |")
    print("|---" * 10 + "|")
    table: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for name, r in _plain(width).items():
        table[(name, 1)] = [r]
    shards = {}
    for world in args.worlds:
        shards[world], by_step = _spawn(world, width)
        for name, ranks in by_step.items():
            table[(name, world)] = ranks
    for (name, world), ranks in table.items():
        shard = shards.get(world, mib) if name.startswith("fsdp") else mib
        rows = 0.0 if name == SINGLE else K * mib / world
        got = [r["sampled"] for r in ranks]
        sampled = None if None in got else max(got)
        pred = formula = "—"
        if name == PER_TASK:
            single = [r["sampled"] for r in table[(SINGLE, world)]]
            pred = "—" if None in single else f"{rows + max(single):.1f}"
            if world > 1:
                formula = f"{(K + 1) * mib / world + 4 * unit:.1f}"
        acc = [r["acc"] for r in ranks]
        unseen = max(sum(a["unseen"].values()) for a in acc)
        print(
            f"| {name} | {world} | {shard:.1f} | {rows:.1f} | {_fmt(sampled)} | {pred} | {formula} | "
            f"{max(a['naive_peak'] for a in acc):.1f} | {max(a['peak'] for a in acc):.1f} | "
            f"{unseen:.1f} |"
        )
    print("\nlive MiB at the by-address peak, by allocating operator (rank 0):\n")
    print(f"| step | W | {' | '.join(KINDS)} | total |")
    print("|---" * (len(KINDS) + 3) + "|")
    for (name, world), ranks in table.items():
        if name.startswith("fsdp"):
            a = ranks[0]["acc"]
            parts = " | ".join(f"{a['at_peak'].get(k, 0.0):.1f}" for k in KINDS)
            print(f"| {name} | {world} | {parts} | {a['peak']:.1f} |")


if __name__ == "__main__":
    main()
