"""Peak memory per rank of a multi-task step on an FSDP2 (``fully_shard``) MLP, W = 1 and 2.

A step is forward + the per-task differentiation + UPGrad, written into ``p.grad``, on a rank's
slice of a fixed global batch (gloo on the CPU; ranks are processes spawned here):

* ``fsdp per_task_backward``: :func:`gradfn.integrations.fsdp.per_task_backward` (``K``
  backward passes, the rank's ``K × n/W`` rows, one ``K × K`` all-reduce), W = 1 and 2;
* ``fsdp keep_unsharded``: the same with ``keep_unsharded=True``;
* ``fsdp sum(losses).backward()``: the single-loss step, for scale;
* W = 1 without FSDP: ``aggregators.backward(..., gramian="rows")`` and ``"streaming"`` (the
  Gramian without the rows, which FSDP cannot use: it needs ``autograd.grad`` w.r.t. the
  parameters).

Peak memory as in ``benchmarks/backward.py`` (CPU: the profiler's allocation events summed in
time order over the step, the sharded parameters excluded), the maximum over the ranks.

Usage::

    python -m benchmarks.fsdp_memory            # a 3.2 M-parameter MLP, K = 8
    python -m benchmarks.fsdp_memory --quick    # a smaller MLP (smoke run)
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import gradfn.aggregators as A
from benchmarks.backward import peak_mib
from gradfn.integrations.fsdp import per_task_backward

K = 8


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


def _worker(rank: int, world: int, port: int, width: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        model = _model(width)
        for layer in model[2:-1]:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        x, y = _batch(rank, world)
        cpu = torch.device("cpu")

        def per_task(keep: bool) -> Callable[[], None]:
            def run() -> None:
                per_task_backward(_losses(model, x, y), model, "upgrad", keep_unsharded=keep)

            return run

        def single() -> None:
            torch.stack(_losses(model, x, y)).sum().backward()

        runs = {
            "fsdp per_task_backward": per_task(False),
            "fsdp keep_unsharded": per_task(True),
            "fsdp sum(losses).backward()": single,
        }
        peaks = {name: peak_mib(fn, model, cpu) for name, fn in runs.items()}
        shard = sum(p.to_local().numel() * 4 for p in model.parameters()) / 2**20
        torch.save({"peaks": peaks, "shard": shard}, os.path.join(out, f"{world}_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain(width: int) -> dict[str, float]:
    model = _model(width)
    x, y = _batch(0, 1)
    cpu = torch.device("cpu")

    def rows_or_streaming(gramian: str) -> Callable[[], None]:
        def run() -> None:
            A.backward(_losses(model, x, y), model, "upgrad", gramian=gramian)

        return run

    return {
        f"no FSDP, gramian={g!r}": peak_mib(rows_or_streaming(g), model, cpu)
        for g in ("rows", "streaming")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller MLP (smoke run)")
    args = parser.parse_args()
    width = 256 if args.quick else 1024
    torch.set_num_threads(1)
    n = sum(p.numel() for p in _model(width).parameters())
    print(f"MLP 64-{width}x4-{K}: {n / 1e6:.2f} M parameters ({n * 4 / 2**20:.1f} MiB), K = {K}")
    print(f"rows K·n·4 = {K * n * 4 / 2**20:.1f} MiB; global batch 64; CPU, gloo\n")
    print("| step | W | parameter shard MiB | peak MiB per rank (max over ranks) |")
    print("|---|---|---|---|")
    for name, mib in _plain(width).items():
        print(f"| {name} | 1 | {n * 4 / 2**20:.1f} | {mib:.1f} |")
    for world in (1, 2):
        with tempfile.TemporaryDirectory() as out:
            mp.start_processes(
                _worker,
                args=(world, _free_port(), width, out),
                nprocs=world,
                join=True,
                start_method="spawn",
            )
            res = [torch.load(os.path.join(out, f"{world}_{r}.pt")) for r in range(world)]
        shard = max(r["shard"] for r in res)
        for name in res[0]["peaks"]:
            peak = max(r["peaks"][name] for r in res)
            print(f"| {name} | {world} | {shard:.1f} | {peak:.1f} |")


if __name__ == "__main__":
    main()
