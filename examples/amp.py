"""Mixed precision with both gradfn adapters: autocast and ``torch.amp.GradScaler``.

    python examples/amp.py            # bfloat16 autocast on CPU; float16 + GradScaler on CUDA
    python examples/amp.py --quick    # a smoke run (CI)

* ``autocast_dtype``: every task's forward runs under ``torch.autocast``; the losses, the
  per-task statistics and the gradients written to ``p.grad`` stay float32.
* ``scaler``: the adapters scale the losses before differentiating, take every decision on the
  unscaled gradients, and write ``p.grad = gradient × scale``: ``scaler.step(optimizer)`` unscales
  it ONCE (the GCond output is never unscaled twice) and ``scaler.update()`` adjusts the scale. A
  step with an overflow leaves gradfn's state unchanged and ``scaler.step`` skips the optimizer
  step. This script forces one overflow (an ``inf`` in the data) to show it.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from gradfn import GradientConductor, SonGokuScheduler, TaskSpec

K = 3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
        self.heads = nn.Linear(64, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.trunk(x))


def batch(step: int, device, poison: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(32, 8, generator=g)
    w = torch.randn(8, generator=g)
    y = torch.stack([x @ w, -(x @ w) + 0.3 * x[:, 1], torch.cos(x[:, 2])], dim=1)
    if poison:
        x[0, 0] = float("inf")
    return x.to(device), y.to(device)


def task_loss(k: int):
    def loss_fn(model: nn.Module, b) -> torch.Tensor:
        x, y = b
        return nn.functional.mse_loss(model(x)[:, k].float(), y[:, k])

    return loss_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="a few steps only (smoke run)")
    args = parser.parse_args()
    steps = 6 if args.quick else args.steps
    bad = steps // 2  # the step whose data overflows
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.bfloat16
    print(f"device {device.type}, autocast {dtype}")

    # --- SON-GOKU
    model = Net().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)
    tasks = [TaskSpec(f"task{k}", task_loss(k)) for k in range(K)]
    sched = SonGokuScheduler(
        model, tasks, opt, refresh_period=4, autocast_dtype=dtype, scaler=scaler
    )
    skipped = 0
    for t in range(steps):
        b = batch(t, device, poison=t == bad)
        losses = sched.step({spec.name: b for spec in tasks})  # scaler.step/update inside
        skipped += int(sched.state.skipped)
    print(
        f"SON-GOKU: skipped {skipped} step(s), scale {scaler.get_scale():g}, "
        f"groups {sched.schedule_snapshot()}, losses {losses}"
    )

    # --- GradientConductor: the usual GradScaler loop around conductor.step
    model2 = Net().to(device)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3, betas=(0.0, 0.95))
    scaler2 = torch.amp.GradScaler(device.type, init_scale=2.0**10)
    loss_fns = {
        f"task{k}": (lambda out, y, k=k: nn.functional.mse_loss(out[:, k].float(), y[:, k]))
        for k in range(K)
    }
    gcond = GradientConductor(
        model2,
        loss_fns,
        {name: 1.0 for name in loss_fns},
        accumulation_steps=K,
        autocast_dtype=dtype,
        scaler=scaler2,
    )
    skipped = 0
    for t in range(steps):
        opt2.zero_grad()
        micro = [batch(100 * t + i, device, poison=t == bad) for i in range(K)]
        stats = gcond.step(iter(micro).__next__)  # p.grad = GCond output × scale
        scaler2.step(opt2)  # unscales once; skips the step after an overflow
        scaler2.update()
        skipped += int(stats["skipped"])
    print(
        f"GCond: skipped {skipped} step(s), scale {scaler2.get_scale():g}, "
        f"final_grad_norm {stats['final_grad_norm']:.4f}"
    )
    print("amp run finished")


if __name__ == "__main__":
    main()
