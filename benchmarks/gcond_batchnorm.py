"""GradientConductor's ``freeze_bn`` modes on a small BatchNorm CNN: held-out accuracy, running
statistics after training and step time, per mode.

Problem: scikit-learn's ``load_digits`` (8×8 images, 1437 train / 360 held-out), a two-layer
BatchNorm CNN with three heads and three losses: the digit (10 classes, the reported accuracy),
its parity and ``digit ≥ 5``. GCond with ``accumulation_steps=6`` (stochastic: two micro-batches
of 32 per loss), plain SGD (``lr=0.1``; GCond has its own momentum), ``--steps`` steps per seed; the model is evaluated in eval
mode, i.e. with the running statistics training left it with.

Modes (``GradientConductor(freeze_bn=...)``):

* ``True``: BatchNorm in eval mode during accumulation (running statistics, never updated);
* ``False``: train mode (batch statistics; running statistics updated once per micro-batch);
* ``"running"``: running statistics during the passes, updated once per micro-batch from it.

Usage::

    python -m benchmarks.gcond_batchnorm            # 3 seeds × 150 steps (about a minute)
    python -m benchmarks.gcond_batchnorm --seeds 1 --steps 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from benchmarks._common import add_common_args, environment, progress, setup
from gradfn.adapters import GradientConductor

MODES: tuple[bool | str, ...] = (True, False, "running")


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``load_digits`` as ``(N, 1, 8, 8)`` images in ``[0, 1]``; a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    cut = int(0.8 * len(y))
    return x[:cut], y[:cut], x[cut:], y[cut:]


class Net(nn.Module):
    """conv(16) → BN → ReLU → conv(32, stride 2) → BN → ReLU → flatten (512) → heads (10, 2, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.heads = nn.ModuleList([nn.Linear(512, 10), nn.Linear(512, 2), nn.Linear(512, 2)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.trunk(x)
        return [head(h) for head in self.heads]


ce = nn.functional.cross_entropy
LOSSES = {
    "digit": lambda out, y: ce(out[0], y),
    "parity": lambda out, y: ce(out[1], y % 2),
    "high": lambda out, y: ce(out[2], (y >= 5).long()),
}


def run(mode: bool | str, seed: int, steps: int, device: torch.device) -> dict[str, float]:
    xtr, ytr, xte, yte = (t.to(device) for t in digits())
    torch.manual_seed(seed)
    model = Net().to(device).train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # GCond has its own momentum
    gc = GradientConductor(model, LOSSES, dict.fromkeys(LOSSES, 1.0), 6, freeze_bn=mode)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(ytr), (32,), generator=gen).to(device)
        return xtr[idx], ytr[idx]

    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        gc.step(batch)
        opt.step()
    elapsed = (time.perf_counter() - start) / steps
    model.eval()
    with torch.no_grad():
        acc = float((model(xte)[0].argmax(1) == yte).float().mean())
    bn = model.trunk[1]
    return {
        "acc": acc,
        "ms": 1e3 * elapsed,
        "tracked": float(bn.num_batches_tracked),
        "var": float(bn.running_var.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    add_common_args(parser)
    args = parser.parse_args()
    device = setup(args)
    print(environment(device))
    print()
    print(
        "| `freeze_bn` | held-out accuracy (per seed) | mean | first BN: batches tracked, "
        "mean running var | ms / step |"
    )
    print("|---|---|---|---|---|")
    for mode in progress(MODES, "gcond_batchnorm"):
        rows = [run(mode, seed, args.steps, device) for seed in range(args.seeds)]
        accs = [r["acc"] for r in rows]
        print(
            f"| `{mode!r}` | {', '.join(f'{a:.4f}' for a in accs)} | "
            f"{statistics.mean(accs):.4f} | {rows[0]['tracked']:.0f}, {rows[0]['var']:.3f} | "
            f"{statistics.median(r['ms'] for r in rows):.1f} |"
        )


if __name__ == "__main__":
    main()
