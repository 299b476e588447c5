"""Multi-task training of an FSDP2 (``fully_shard``) model with a Gramian aggregator.

    torchrun --nproc_per_node=2 examples/fsdp.py            # gloo on CPU, NCCL when CUDA is there
    torchrun --nproc_per_node=2 examples/fsdp.py --quick    # a smoke run (CI)
    python examples/fsdp.py --quick                         # one process, no sharding

Every rank holds ``1/W`` of each parameter and trains on its own slice of each batch.
``gradfn.integrations.fsdp.per_task_backward`` runs one backward per task (FSDP all-gathers the
parameters and reduce-scatters that task's gradient into the sharded ``p.grad``), forms the
rank's partial Gramian from its shards and all-reduces it (``K × K`` numbers), so UPGrad's
weights are bit-identical on every rank; the rank's shard of ``Σ_k w_k g_k`` is written to
``p.grad`` for the optimizer. The script counts the collectives of one step against a plain
``sum(losses).backward()``, then runs a few steps of SON-GOKU (``songoku_backward``) and one
cycle of GradientConductor (``conductor_backward``) on the same sharded model, counting their
collectives too, and checks at the end that the ranks agree.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from gradfn.algorithms import ConductorConfig, SonGokuConfig
from gradfn.integrations.fsdp import conductor_backward, per_task_backward, songoku_backward

K = 3


class Net(nn.Module):
    """A shared trunk of two blocks and one linear head per task."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(8, 64), nn.Tanh()),
                nn.Sequential(nn.Linear(64, 64), nn.Tanh()),
            ]
        )
        self.heads = nn.Linear(64, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.heads(x)


def shard(step: int, rank: int, world: int, batch: int, device) -> tuple[torch.Tensor, ...]:
    """This rank's slice of step ``step``'s global batch (tasks 0 and 1 conflict)."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(batch, 8, generator=g)
    w = torch.randn(8, generator=g)
    y = torch.stack([x @ w, -(x @ w) + 0.2 * x[:, 0], torch.sin(x[:, 1])], dim=1)
    size = batch // world
    part = slice(rank * size, (rank + 1) * size)
    return x[part].to(device), y[part].to(device)


def losses_of(model: nn.Module, batch) -> list[torch.Tensor]:
    x, y = batch
    out = model(x)
    return [nn.functional.mse_loss(out[:, k], y[:, k]) for k in range(K)]


class CountCollectives:
    """Counts FSDP's all-gathers and reduce-scatters and the all-reduces (calls and bytes of the
    full-size tensor) while active, by wrapping the ``torch.distributed`` functions."""

    NAMES: ClassVar[dict[str, int]] = {
        "all_gather_single": 0,
        "reduce_scatter_single": 1,
        "all_reduce": 0,
    }

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self._saved: dict[str, Callable[..., Any]] = {}

    def __enter__(self) -> CountCollectives:
        for name, arg in self.NAMES.items():
            original = getattr(dist, name)
            self._saved[name] = original

            def wrapped(*args, _o=original, _n=name, _a=arg, **kwargs):
                keys = ("output", "input") if _n == "reduce_scatter_single" else ()
                t = kwargs[keys[_a]] if keys and keys[_a] in kwargs else args[_a]
                self.calls[_n] += 1
                self.bytes[_n] += t.numel() * t.element_size()
                return _o(*args, **kwargs)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)

    def line(self) -> str:
        return ", ".join(f"{n} {self.calls[n]} ({self.bytes[n]} B)" for n in self.NAMES)


# Buffers handed to gloo collectives are kept referenced until the process group is destroyed.
_COLLECTIVE_BUFFERS: list[torch.Tensor] = []


def agree(x: torch.Tensor) -> bool:
    """Is ``x`` bit-identical on every rank?"""
    if not dist.is_initialized():
        return True
    flat = x.detach().reshape(-1).double()
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    _COLLECTIVE_BUFFERS.extend([flat, *gathered])
    return all(torch.equal(gathered[0], other) for other in gathered)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--quick", action="store_true", help="a few steps only (smoke run)")
    args = parser.parse_args()
    steps = 6 if args.quick else args.steps

    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    cuda = torch.cuda.is_available()
    if launched:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if launched else 0
    world = dist.get_world_size() if launched else 1
    device = (
        torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}") if cuda else torch.device("cpu")
    )
    if cuda:
        torch.cuda.set_device(device)

    model = Net().to(device)
    if launched:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    state, weights = None, torch.zeros(K)
    for t in range(steps):
        batch = shard(t, rank, world, 16 * world, device)
        opt.zero_grad()
        losses = losses_of(model, batch)
        state, agg = per_task_backward(losses, model, "upgrad", state=state)
        opt.step()
        weights = agg.weights
        if rank == 0 and (t % max(steps // 5, 1) == 0 or t == steps - 1):
            print(
                f"step {t:3d}  losses {[round(float(v.detach()), 3) for v in losses]}  "
                f"weights {[round(float(v), 3) for v in weights]}"
            )

    batch = shard(steps, rank, world, 16 * world, device)
    with CountCollectives() as plain:
        opt.zero_grad()
        sum(losses_of(model, batch)).backward()
    with CountCollectives() as per_task:
        opt.zero_grad()
        state, _ = per_task_backward(losses_of(model, batch), model, "upgrad", state=state)
    with CountCollectives() as kept:
        opt.zero_grad()
        losses = losses_of(model, batch)
        state, _ = per_task_backward(losses, model, "upgrad", state=state, keep_unsharded=True)
    songoku_state, counts = None, {}
    config = SonGokuConfig(num_tasks=K, refresh_period=2, tau_schedule=0.0)
    for t in range(4):  # the second step recolours: count it
        batch = shard(steps + 1 + t, rank, world, 16 * world, device)
        with CountCollectives() as songoku_count:
            opt.zero_grad()
            songoku_state, _ = songoku_backward(
                losses_of(model, batch), model, config, songoku_state
            )
        counts[t] = songoku_count
        opt.step()
    gcond = ConductorConfig(lambdas=[1.0] * K, accumulation_steps=2, stochastic=False)
    micro = [shard(steps + 5 + i, rank, world, 16 * world, device) for i in range(2)]
    with CountCollectives() as gcond_count:
        opt.zero_grad()
        gcond_state, _ = conductor_backward((losses_of(model, b) for b in micro), model, gcond)
    opt.step()
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    ok = agree(weights) and agree(torch.cat([p.detach().reshape(-1) for p in full]))
    ok = ok and agree(songoku_state.groups) and agree(gcond_state.stats.raw_norms)
    if rank == 0:
        print(f"one step, W={world}, K={K} (forward included):")
        print(f"  sum(losses).backward(): {plain.line()}")
        print(f"  per_task_backward:      {per_task.line()}")
        print(f"  ... keep_unsharded=True: {kept.line()}")
        print(f"  songoku_backward, refresh step (all tasks): {counts[1].line()}")
        print(f"  songoku_backward, one group: {counts[2].line()}")
        print(f"  conductor_backward, one cycle of 2 micro-batches: {gcond_count.line()}")
        print(
            f"SON-GOKU groups: {[g.nonzero().flatten().tolist() for g in songoku_state.groups[: int(songoku_state.num_groups)]]}"
        )
        print(f"ranks agree: {ok}")
    if launched:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
