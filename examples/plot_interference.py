"""Plot SON-GOKU's interference ρ = −cos over training (a PNG heat-map; needs matplotlib).

Six regression tasks share a trunk: tasks 0–1 fit a target, tasks 2–3 want the opposite from the
same head (they conflict with 0–1), tasks 4–5 fit an unrelated target on a second head. The
functional SON-GOKU transform recolours every ``R`` steps; after each refresh its state holds the
interference matrix ``rho`` (K×K), the conflict graph and the colour groups. The figure shows:

* left: ``ρ_ij`` of every task pair (rows) at every refresh (columns);
* right: the last refresh's ``ρ`` matrix, with the colour groups in the title.

Run (``pip install matplotlib`` or ``pip install -e ".[plot]"``):

    python examples/plot_interference.py --out interference.png
    python examples/plot_interference.py --out /tmp/rho.png --quick
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt
import torch

from gradfn import songoku

K, D, H = 6, 16, 32
HEAD = (0, 0, 0, 0, 1, 1)  # the head each task reads
SIGN = (1.0, 1.0, -1.0, -1.0, 1.0, 1.0)


def loss_fn(params: dict[str, torch.Tensor], batch: tuple) -> list[torch.Tensor]:
    x, y = batch
    h = torch.relu(x @ params["trunk.w1"].T)
    h = torch.relu(h @ params["trunk.w2"].T)
    out = h @ params["heads.w"].T  # (B, 2)
    return [((out[:, HEAD[k]] - y[:, k]) ** 2).mean() for k in range(K)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="interference.png", help="path of the PNG to write")
    parser.add_argument("--steps", type=int, default=320)
    parser.add_argument("--refresh-period", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="a few refreshes only (smoke run)")
    args = parser.parse_args()
    steps, r = (24, 4) if args.quick else (args.steps, args.refresh_period)

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
    history: list[torch.Tensor] = []  # ρ after each refresh
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=gen)
        before = int(state.refreshes)
        state, grads = tx.update(state, params, (x[idx], y[idx]))
        params = {n: p - 0.02 * grads[n] for n, p in params.items()}
        if int(state.refreshes) > before:
            history.append(state.rho.clone())
    if not history:
        raise SystemExit("no refresh happened: use --steps >= --refresh-period")

    pairs = [(i, j) for i in range(K) for j in range(i + 1, K)]
    over_time = torch.stack([torch.stack([rho[i, j] for i, j in pairs]) for rho in history], 1)
    m = int(state.num_groups)
    groups = [torch.nonzero(state.groups[g]).flatten().tolist() for g in range(m)]

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.5), width_ratios=(1.6, 1))
    im = ax0.imshow(over_time.numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1)
    ax0.set_yticks(range(len(pairs)), [f"{i}-{j}" for i, j in pairs], fontsize=7)
    ticks = range(0, len(history), max(1, len(history) // 10))
    ax0.set_xticks(ticks, [str(t + 1) for t in ticks])
    ax0.set_xlabel(f"refresh (every R={r} steps)")
    ax0.set_ylabel("task pair")
    ax0.set_title("interference ρ = −cos over training")
    fig.colorbar(im, ax=ax0, label="ρ (> τ: conflict edge)")
    last = history[-1].numpy()
    ax1.imshow(last, cmap="RdBu_r", vmin=-1, vmax=1)
    for i in range(K):
        for j in range(K):
            shade = "white" if abs(last[i, j]) > 0.6 else "black"
            ax1.text(j, i, f"{last[i, j]:+.2f}", ha="center", va="center", fontsize=7, c=shade)
    ax1.set_xticks(range(K))
    ax1.set_yticks(range(K))
    ax1.set_title(f"last refresh, τ={float(state.tau):.2f}\ngroups {groups}", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"{len(history)} refreshes; final colour groups {groups}; wrote {args.out}")


if __name__ == "__main__":
    main()
