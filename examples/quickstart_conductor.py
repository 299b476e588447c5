"""Quick start: GradientConductor (GCond) on a shared MLP with two conflicting regression losses.

The model has one trunk and a two-output head. Loss ``fit`` regresses output 0 on a target;
loss ``smooth`` pulls output 0 towards a different, partly opposed target (weighted 0.5) and
output 1 towards a third. The conductor accumulates each loss's gradient over micro-batches,
resolves their conflict (GCond's smooth angle rule with arbitration), applies its own momentum
and writes ONE gradient to ``p.grad``; any optimizer then takes the step. Run:

    python examples/quickstart_conductor.py            # a few seconds on a laptop CPU
    python examples/quickstart_conductor.py --quick    # a smoke run (CI)
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from gradfn import GradientConductor


def make_data(n: int, d: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, d, generator=generator)
    w, v = torch.randn(d, generator=generator), torch.randn(d, generator=generator)
    # column 0: the main target; column 1: an opposed target for output 0; column 2: output 1
    y = torch.stack([x @ w, -(x @ w) + 0.3 * (x @ v), x @ v], dim=1)
    return x, y


def fit(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out[:, 0], y[:, 0])


def smooth(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out[:, 0], y[:, 1]) + nn.functional.mse_loss(out[:, 1], y[:, 2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps")
    parser.add_argument("--quick", action="store_true", help="a few steps only (smoke run)")
    args = parser.parse_args()
    steps = 4 if args.quick else args.steps

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x, y = make_data(512, 16, gen)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)
    )
    # The conductor owns the first moment (its own momentum): AdamW with beta1 = 0, as the
    # reference's README recommends.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.0, 0.95))
    conductor = GradientConductor(
        model,
        loss_fns={"fit": fit, "smooth": smooth},
        lambdas={"fit": 1.0, "smooth": 0.5},
        accumulation_steps=4,  # N micro-batches per step; stochastic mode: N/2 per loss
    )

    def data_provider() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, x.shape[0], (32,), generator=gen)
        return x[idx], y[idx]  # (x, y): the model gets x, every loss gets (output, y)

    every = max(1, steps // 6)
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        stats = conductor.step(data_provider)  # accumulate, resolve, momentum; writes p.grad
        optimizer.step()
        if step % every == 0 or step == steps:
            print(
                f"step {step:4d}  loss/fit={stats['loss/fit']:.3f}  "
                f"loss/smooth={stats['loss/smooth']:.3f}  "
                f"min cos={stats['min_cosine_sim']:+.2f}  resolutions={stats['proj_iters']:.0f}"
            )
    with torch.no_grad():
        out = model(x)
    print(f"final: fit={fit(out, y).item():.3f}  smooth={smooth(out, y).item():.3f}")
    print("state keys saved by state_dict():", len(conductor.state_dict()["state"]))


if __name__ == "__main__":
    main()
