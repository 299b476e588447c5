"""Data-parallel multi-task training with both gradfn adapters (torch.distributed).

    torchrun --nproc_per_node=2 examples/ddp.py            # gloo on CPU, NCCL when CUDA is there
    torchrun --nproc_per_node=2 examples/ddp.py --quick    # a smoke run (CI)
    python examples/ddp.py --quick                         # one process, no process group

Every rank trains on its own shard of each batch. The model is wrapped in
``DistributedDataParallel`` as usual; the adapters unwrap it (DDP's own gradient hooks never fire)
and average the per-task gradients across ranks BEFORE any decision: SON-GOKU's EMAs, conflict
graph and colouring, GCond's Gramian, resolution and arbitrator all see the same numbers on every
rank, so the ranks take the same decisions with nothing broadcast, and the parameters stay
identical. The script checks that at the end.
"""

from __future__ import annotations

import argparse
import os

import optree
import torch
import torch.distributed as dist
from torch import nn

from gradfn import GradientConductor, SonGokuScheduler, TaskSpec

K = 3


class Net(nn.Module):
    """A shared trunk and one linear head per task."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.Tanh())
        self.heads = nn.Linear(32, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.trunk(x))


def shard(step: int, rank: int, world: int, batch: int, device) -> tuple[torch.Tensor, ...]:
    """This rank's slice of step ``step``'s global batch (tasks 0 and 1 conflict)."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(batch, 8, generator=g)
    w = torch.randn(8, generator=g)
    y = torch.stack([x @ w, -(x @ w) + 0.2 * x[:, 0], torch.sin(x[:, 1])], dim=1)
    size = batch // world
    part = slice(rank * size, (rank + 1) * size)
    return x[part].to(device), y[part].to(device)


def task_loss(k: int):
    def loss_fn(model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(model(x)[:, k], y[:, k])

    return loss_fn


# Buffers handed to gloo collectives are released on its worker threads, possibly after the
# collective returns; keeping them referenced here until the process group is destroyed means
# Python, not a worker thread racing interpreter shutdown, frees them.
_COLLECTIVE_BUFFERS: list[torch.Tensor] = []


def ranks_agree(model: nn.Module) -> bool:
    """Are the parameters bit-identical on every rank?"""
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    if not dist.is_initialized():
        return True
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    _COLLECTIVE_BUFFERS.extend([flat, *gathered])
    return all(torch.equal(gathered[0], other) for other in gathered)


def states_agree(state) -> bool:
    """Is the conductor's state (EMAs, history, momentum) bit-identical on every rank?"""
    flat = torch.cat([x.detach().reshape(-1).double() for x in optree.tree_leaves(state)])
    if not dist.is_initialized():
        return True
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    _COLLECTIVE_BUFFERS.extend([flat, *gathered])
    return all(torch.equal(gathered[0], other) for other in gathered)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per method")
    parser.add_argument("--quick", action="store_true", help="a few steps only (smoke run)")
    args = parser.parse_args()
    steps = 6 if args.quick else args.steps

    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    cuda = torch.cuda.is_available()
    if launched:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if launched else 0
    world = dist.get_world_size() if launched else 1
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    wrap = (
        (lambda m: nn.parallel.DistributedDataParallel(m, device_ids=[local] if cuda else None))
        if launched
        else (lambda m: m)
    )
    global_batch = 16 * world

    # --- SON-GOKU: colour the tasks by interference, train one colour group per step
    model = wrap(Net().to(device))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tasks = [TaskSpec(f"task{k}", task_loss(k)) for k in range(K)]
    sched = SonGokuScheduler(model, tasks, opt, refresh_period=4, tau_schedule=None)
    for t in range(steps):
        batch = shard(t, rank, world, global_batch, device)
        losses = sched.step({spec.name: batch for spec in tasks})
    agree = ranks_agree(model)
    if rank == 0:
        print(f"SON-GOKU on {world} rank(s): last losses {losses}")
        print(f"  colour groups: {sched.schedule_snapshot()}  ranks agree: {agree}")

    # --- GradientConductor: accumulate per-loss gradients, resolve, momentum. ddp_sync="avg"
    # (the default) averages the accumulated A_k and losses across ranks once per cycle
    # (K·n + 2K floats), before the Gramian / resolution / arbitrator: every rank takes the same
    # decisions and writes the same gradient (the reference instead resolves per rank and sums
    # the outputs: ddp_sync="broadcast")
    model2 = wrap(Net().to(device))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3, betas=(0.0, 0.95))
    loss_fns = {
        f"task{k}": (lambda out, y, k=k: nn.functional.mse_loss(out[:, k], y[:, k]))
        for k in range(K)
    }
    gcond = GradientConductor(
        model2, loss_fns, {name: 1.0 for name in loss_fns}, accumulation_steps=K, ddp_sync="avg"
    )
    counter = iter(range(10**9))
    for _ in range(steps):
        opt2.zero_grad()
        stats = gcond.step(lambda: shard(next(counter), rank, world, global_batch, device))
        opt2.step()
    agree2 = ranks_agree(model2)
    agree3 = states_agree(gcond.state)  # a collective: every rank calls it
    if rank == 0:
        print(f"GCond on {world} rank(s): final_grad_norm {stats['final_grad_norm']:.4f}")
        print(f"  min_cosine_sim {stats['min_cosine_sim']:.3f}  ranks agree: {agree2}")
        print(f"  conductor state identical on every rank: {agree3}")
        print(f"ranks agree: {agree and agree2 and agree3}")
    if launched:
        dist.barrier()  # every rank is past its last collective
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
