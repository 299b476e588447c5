"""Multi-task training with PyTorch Lightning: SON-GOKU, GradientConductor or an aggregator.

    pip install "gradfn[lightning]"
    python examples/lightning_multitask.py                     # SON-GOKU
    python examples/lightning_multitask.py --method gcond      # GradientConductor
    python examples/lightning_multitask.py --method upgrad     # an aggregator
    python examples/lightning_multitask.py --precision bf16-mixed
    python examples/lightning_multitask.py --quick             # a smoke run (CI)

A ``GradfnModule`` (manual optimisation) trains three regression tasks on one trunk (task ``c``
opposes ``a``) with Lightning's CPU accelerator, logs what gradfn decided with ``self.log_dict``
(a CSV log under ``--out``), and is checkpointed by the Trainer. A second Trainer then resumes
from the half-way checkpoint, and the script checks that the resumed run ends where an
uninterrupted run ends: the same parameters and the same gradfn state.
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradfn.adapters import GradientConductor, SonGokuScheduler, TaskSpec
from gradfn.integrations.lightning import AggregatorBackward, GradfnModule
from gradfn.integrations.logging import aggregated_metrics, conductor_metrics, songoku_metrics

SIGNS = {"a": 1.0, "b": 0.5, "c": -1.0}  # each task's target: sign × (the shared signal)
MICRO = 3  # GradientConductor: micro-batches accumulated per step (a multiple of K = 3)


def task_loss(k: int, sign: float):
    def loss_fn(model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(model(x)[:, k].float(), sign * y)

    return loss_fn


def output_loss(k: int, sign: float):  # GradientConductor calls loss_fn(model(x), y)
    return lambda out, y: nn.functional.mse_loss(out[:, k].float(), sign * y)


class MultiTask(GradfnModule):
    def __init__(self, method: str, lr: float = 0.02) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, len(SIGNS)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_gradfn(self, autocast_dtype, scaler):
        amp = {"autocast_dtype": autocast_dtype, "scaler": scaler}  # from the Trainer's precision
        names = list(SIGNS)
        if self.hparams.method == "songoku":
            tasks = [TaskSpec(n, task_loss(k, s)) for k, (n, s) in enumerate(SIGNS.items())]
            return SonGokuScheduler(self.net, tasks, None, refresh_period=4, **amp)
        if self.hparams.method == "gcond":
            losses = {n: output_loss(k, s) for k, (n, s) in enumerate(SIGNS.items())}
            return GradientConductor(self.net, losses, dict.fromkeys(names, 1.0), MICRO, **amp)
        return AggregatorBackward(self.net, self.hparams.method, task_names=names)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def training_step(self, batch, batch_idx):
        x, y = batch
        method = self.gradfn
        if isinstance(method, SonGokuScheduler):
            self.gradfn_step({n: (x, y) for n in SIGNS})
            self.log_dict(songoku_metrics(method.state, method.names))
        elif isinstance(method, GradientConductor):
            self.gradfn_step(list(zip(x.chunk(MICRO), y.chunk(MICRO), strict=True)))
            self.log_dict(conductor_metrics(method.state, method.loss_names))
        else:  # the forward runs here, under the Trainer's autocast; gradfn's backward outside
            out = self(x)
            losses = {
                n: nn.functional.mse_loss(out[:, k].float(), s * y)
                for k, (n, s) in enumerate(SIGNS.items())
            }
            self.log_dict(aggregated_metrics(self.gradfn_step(losses), method.task_names))
            self.log_dict({f"aggregator/loss/{n}": v.detach() for n, v in losses.items()})


def data(n: int) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    y = torch.tanh(x[:, :4].sum(dim=1)) + 0.1 * x[:, 4]
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)


def fit(args, out: Path, epochs: int, name: str, ckpt: str | None = None):
    model = MultiTask(args.method)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        precision=args.precision,
        logger=CSVLogger(out, name=name),
        callbacks=[ModelCheckpoint(dirpath=out / name, save_last=True)],  # last.ckpt
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(model, data(args.samples), ckpt_path=ckpt)
    return model, trainer


def last_losses(trainer) -> dict[str, float]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh)]
    keys = [k for k in rows[-1] if "/loss/" in k]
    return {k.split("/")[-1]: float(rows[-1][k]) for k in keys if rows[-1][k]}


def equal(a, b) -> bool:
    """Same nested containers and bit-identical tensors (NaN equals NaN)."""
    if isinstance(a, torch.Tensor):
        same = (a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b
        return a.shape == b.shape and bool(same.all())
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="songoku", help="songoku, gcond or an aggregator")
    parser.add_argument("--precision", default="32-true", help="e.g. 32-true or bf16-mixed")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--out", default="lightning_multitask", help="logs and checkpoints go here")
    parser.add_argument("--quick", action="store_true", help="a few steps only (smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.samples = 4, 128
    out = Path(args.out) / f"{args.method}_{args.precision}"
    shutil.rmtree(out, ignore_errors=True)  # this script's own output from an earlier run
    half = args.epochs // 2

    whole, trainer = fit(args, out, args.epochs, "whole")
    print(f"{args.method}, {args.precision}: {trainer.global_step} steps")
    print("last losses:", {k: round(v, 4) for k, v in last_losses(trainer).items()})
    if isinstance(whole.gradfn, SonGokuScheduler):
        print("colour groups:", whole.gradfn.schedule_snapshot())

    _, first = fit(args, out, half, "first_half")
    ckpt = out / "first_half" / "last.ckpt"
    print(f"checkpoint after {first.global_step} steps: {ckpt}, gradfn state included:",
          "gradfn" in torch.load(ckpt, weights_only=True))  # fmt: skip
    resumed, _ = fit(args, out, args.epochs, "resumed", ckpt=str(ckpt))
    same = equal(list(whole.parameters()), list(resumed.parameters()))
    same_state = equal(whole.gradfn.state_dict(), resumed.gradfn.state_dict())
    print(f"resumed run equals the uninterrupted run: {same and same_state}")


if __name__ == "__main__":
    main()
