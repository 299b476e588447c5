"""Quick start: SON-GOKU on a shared MLP with four regression tasks, two of which conflict.

Tasks ``a`` and ``b`` want the same features; ``c`` is a harmful auxiliary task that reads ``a``'s
head with the opposite target (its gradients oppose ``a``'s and ``b``'s); ``d`` is unrelated. SON-GOKU measures the interference, colours the conflict graph and trains one colour
group per step. Run:

    python examples/quickstart_songoku.py            # ~10 s on a laptop CPU
    python examples/quickstart_songoku.py --steps 64 # shorter
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from gradfn import SonGokuScheduler, TaskSpec, TauSchedule


def make_data(n: int, d: int, generator: torch.Generator) -> dict[str, tuple]:
    x = torch.randn(n, d, generator=generator)
    w = torch.randn(d, generator=generator)
    v = torch.randn(d, generator=generator)
    targets = {"a": x @ w, "b": x @ w + 0.1, "c": -(x @ w), "d": x @ v}
    return {name: (x, y) for name, y in targets.items()}


class Model(nn.Module):
    def __init__(self, d: int, tasks: list[str]) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.heads = nn.ModuleDict({t: nn.Linear(64, 1) for t in tasks if t != "c"})


def task_loss(name: str):
    def loss_fn(model: Model, batch: tuple) -> torch.Tensor:
        x, y = batch
        head = model.heads["a" if name == "c" else name]  # "c" reuses a's head
        return nn.functional.mse_loss(head(model.trunk(x)).squeeze(-1), y)

    return loss_fn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    names = ["a", "b", "c", "d"]
    data = make_data(256, 16, torch.Generator().manual_seed(0))
    model = Model(16, names)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = SonGokuScheduler(
        model,
        tasks=[TaskSpec(name, task_loss(name)) for name in names],
        optimizer=optimizer,
        shared_param_filter=lambda p: any(p is q for q in model.trunk.parameters()),
        refresh_period=16,
        tau_schedule=TauSchedule(kind="constant", tau_initial=0.25, tau_target=0.25),
    )
    for step in range(1, args.steps + 1):
        losses = scheduler.step(data)  # {task: loss} of the tasks trained this step
        if step % 64 == 0:
            shown = ", ".join(f"{k}={v:.3f}" for k, v in losses.items())
            print(f"step {step:4d}  active: {shown}")
    print("colour groups:", scheduler.schedule_snapshot())
    print("tau:", scheduler.current_tau())


if __name__ == "__main__":
    main()
