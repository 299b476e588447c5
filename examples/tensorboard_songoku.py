"""Log SON-GOKU to TensorBoard: its metrics, the interference matrix and the schedule timeline.

Six regression tasks share a trunk (the problem of ``plot_interference.py``): tasks 0–1 fit a
target, tasks 2–3 want the opposite from the same head, tasks 4–5 fit an unrelated target on a
second head. A :class:`~gradfn.integrations.tensorboard.ScheduleRecorder` is fed every step, and
:func:`~gradfn.integrations.tensorboard.log_to_tensorboard` writes the scalars every step and the
two images after every refresh. Then ``tensorboard --logdir runs``.

Run (``pip install -e ".[tensorboard]"``):

    python examples/tensorboard_songoku.py --logdir runs/songoku
    python examples/tensorboard_songoku.py --quick --logdir /tmp/tb
    python examples/tensorboard_songoku.py --png docs/assets   # the docs' pictures
"""

from __future__ import annotations

import argparse
import os

import torch

from gradfn import songoku
from gradfn.integrations.tensorboard import (
    ScheduleRecorder,
    interference_figure,
    log_to_tensorboard,
    schedule_figure,
    summary_writer,
)

K, D, H = 6, 16, 32
HEAD = (0, 0, 0, 0, 1, 1)  # the head each task reads
SIGN = (1.0, 1.0, -1.0, -1.0, 1.0, 1.0)
NAMES = ["fit-a", "fit-a'", "anti-a", "anti-a'", "fit-b", "fit-b'"]


def loss_fn(params: dict[str, torch.Tensor], batch: tuple) -> list[torch.Tensor]:
    x, y = batch
    h = torch.relu(x @ params["trunk.w1"].T)
    h = torch.relu(h @ params["trunk.w2"].T)
    out = h @ params["heads.w"].T  # (B, 2)
    return [((out[:, HEAD[k]] - y[:, k]) ** 2).mean() for k in range(K)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--logdir", default=None, help="TensorBoard log directory (default: runs/…)"
    )
    parser.add_argument("--png", default=None, help="also write the two images as PNGs here")
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--refresh-period", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="a few refreshes only (smoke run)")
    args = parser.parse_args()
    steps, r = (16, 4) if args.quick else (args.steps, args.refresh_period)

    gen = torch.Generator().manual_seed(0)
    params = {
        "trunk.w1": torch.randn(H, D, generator=gen) * D**-0.5,
        "trunk.w2": torch.randn(H, H, generator=gen) * H**-0.5,
        "heads.w": torch.randn(2, H, generator=gen) * H**-0.5,
    }
    x = torch.randn(2048, D, generator=gen)
    w, v = torch.randn(D, generator=gen), torch.randn(D, generator=gen)
    base = torch.stack([x @ w if HEAD[k] == 0 else x @ v for k in range(K)], dim=1)
    y = base * torch.tensor(SIGN) + 0.1 * torch.randn(x.shape[0], K, generator=gen)

    tx = songoku(loss_fn, num_tasks=K, shared=lambda n: n.startswith("trunk."), refresh_period=r)
    state = tx.init(params)
    recorder = ScheduleRecorder(capacity=64)
    writer = summary_writer(args.logdir)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=gen)
        before = int(state.refreshes)
        state, grads = tx.update(state, params, (x[idx], y[idx]))
        params = {n: p - 0.02 * grads[n] for n, p in params.items()}
        recorder.record(state)
        refreshed = int(state.refreshes) > before
        log_to_tensorboard(writer, state, task_names=NAMES, recorder=recorder, images=refreshed)
    writer.close()
    print(f"{int(state.refreshes)} refreshes; wrote {writer.log_dir}")
    if args.png:
        os.makedirs(args.png, exist_ok=True)
        for name, fig in (
            ("tensorboard_interference.png", interference_figure(state, NAMES)),
            ("tensorboard_schedule.png", schedule_figure(recorder, NAMES)),
        ):
            fig.savefig(os.path.join(args.png, name))
            print(f"wrote {os.path.join(args.png, name)}")


if __name__ == "__main__":
    main()
