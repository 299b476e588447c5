"""PNG figures (matplotlib, Agg backend). Every function returns the file names it wrote.

matplotlib is optional: :func:`available` says whether it can be imported, and the command line
skips the figures without it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.quality.methods import LABELS, SONGOKU_FAMILY

__all__ = [
    "accuracy_vs_time",
    "available",
    "edge_f1_over_training",
    "interference_heatmaps",
    "schedule_timelines",
    "toy_trajectories",
    "write_all",
]

Record = dict[str, Any]


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_EXTRA_COLOURS = ("#000000", "#4b0082", "#8b0000", "#556b2f", "#ff8c00")


def _colour(i: int) -> str:
    """Distinct line colours: matplotlib's ten defaults, then a few more."""
    return f"C{i}" if i < 10 else _EXTRA_COLOURS[(i - 10) % len(_EXTRA_COLOURS)]


def _pick(items: list, n: int) -> list:
    if len(items) <= n:
        return items
    idx = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in idx]


def interference_heatmaps(records: list[Record], out: Path) -> list[str]:
    """ρ = −cos between task gradients over training: Uniform's probe-batch ρ (top row) and
    SON-GOKU's EMA ρ at its refreshes (bottom row), seed of the kept trace."""
    plt = _plt()
    files = []
    for problem in sorted({r["problem"] for r in records}):
        probe = next(
            (
                r
                for r in records
                if r["problem"] == problem and r["method"] == "uniform" and r.get("probes")
            ),
            None,
        )
        sg = next(
            (
                r
                for r in records
                if r["problem"] == problem and r["method"] == "songoku" and r.get("rho")
            ),
            None,
        )
        rows = [
            ("Uniform, probe batch", _pick(probe["probes"], 4)) if probe else None,
            ("SON-GOKU EMA at refresh", _pick(sg["rho"], 4)) if sg else None,
        ]
        rows = [r for r in rows if r and r[1]]
        if not rows:
            continue
        ncol = max(len(r[1]) for r in rows)
        fig, axes = plt.subplots(
            len(rows), ncol, figsize=(2.6 * ncol + 0.8, 2.6 * len(rows)), squeeze=False
        )
        im = None
        for i, (title, snaps) in enumerate(rows):
            for j in range(ncol):
                ax = axes[i][j]
                if j >= len(snaps):
                    ax.axis("off")
                    continue
                im = ax.imshow(snaps[j]["rho"], vmin=-1, vmax=1, cmap="RdBu_r")
                ax.set_title(f"{title}\nstep {snaps[j]['step']}", fontsize=8)
                ax.set_xticks([])
                ax.set_yticks([])
        if im is not None:
            fig.colorbar(im, ax=axes, shrink=0.8, label="interference ρ = −cos")
        fig.suptitle(f"{problem}: interference over training", fontsize=10)
        name = f"interference_{problem}.png"
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append(name)
    return files


def schedule_timelines(records: list[Record], out: Path) -> list[str]:
    """SON-GOKU's active tasks per step (dark = active), refreshes marked."""
    plt = _plt()
    files = []
    for problem in sorted({r["problem"] for r in records}):
        r = next(
            (
                x
                for x in records
                if x["problem"] == problem and x["method"] == "songoku" and x.get("active")
            ),
            None,
        )
        if r is None:
            continue
        active = r["active"]
        k = len(active[0])
        img = [[float(active[t][i]) for t in range(len(active))] for i in range(k)]
        fig, ax = plt.subplots(figsize=(10, 0.28 * k + 1.4))
        ax.imshow(img, aspect="auto", cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
        for s in r.get("refresh_steps", []):
            ax.axvline(s - 0.5, color="tab:red", lw=0.6, alpha=0.7)
        ax.set_yticks(range(k))
        ax.set_yticklabels(r["task_names"], fontsize=7)
        ax.set_xlabel("optimizer step (red: recolouring)")
        ax.set_title(f"{problem}: SON-GOKU schedule (seed {r['seed']})", fontsize=10)
        name = f"schedule_{problem}.png"
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append(name)
    return files


def accuracy_vs_time(records: list[Record], out: Path) -> list[str]:
    """Held-out headline metric against cumulative training time (mean over seeds)."""
    plt = _plt()
    files = []
    for problem in sorted({r["problem"] for r in records}):
        runs = [r for r in records if r["problem"] == problem]
        key = runs[0]["headline"]
        by_method: dict[str, list[Record]] = defaultdict(list)
        for r in runs:
            by_method[r["method"]].append(r)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (method, rs) in enumerate(by_method.items()):
            n = min(len(r["curve"]) for r in rs)
            t = [sum(r["curve"][j]["time"] for r in rs) / len(rs) for j in range(n)]
            y = [sum(r["curve"][j][key] for r in rs) / len(rs) for j in range(n)]
            style = "-" if method in SONGOKU_FAMILY or method.startswith("gcond") else "--"
            ax.plot(
                t,
                y,
                style,
                marker="o",
                ms=2.5,
                lw=1.2,
                color=_colour(i),
                label=LABELS.get(method, method),
            )
        ax.set_xscale("log")
        ax.set_xlabel("training wall-clock (s, log scale)")
        ax.set_ylabel(f"test {key}")
        ax.set_title(f"{problem}: {key} vs wall-clock (mean over seeds)", fontsize=10)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.grid(alpha=0.3)
        name = f"metric_vs_time_{problem}.png"
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append(name)
    return files


def edge_f1_over_training(records: list[Record], out: Path) -> list[str]:
    """Edge F1 of SON-GOKU's conflict graph vs the planted graph at each refresh."""
    plt = _plt()
    files = []
    for problem in sorted({r["problem"] for r in records if r.get("edge_f1")}):
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, method in enumerate(SONGOKU_FAMILY):
            rs = [
                r
                for r in records
                if r["problem"] == problem and r["method"] == method and r.get("edge_f1")
            ]
            if not rs:
                continue
            n = min(len(r["edge_f1"]) for r in rs)
            steps = rs[0]["refresh_steps"][:n]
            mean = [sum(r["edge_f1"][j] for r in rs) / len(rs) for j in range(n)]
            sd = [
                math.sqrt(sum((r["edge_f1"][j] - mean[j]) ** 2 for r in rs) / max(1, len(rs) - 1))
                for j in range(n)
            ]
            if n == 1:  # one colouring, kept for the whole run: a constant graph
                last = max(r["steps"] for r in rs)
                steps, mean, sd = [steps[0], last], mean * 2, sd * 2
            ax.plot(steps, mean, marker="o", ms=3, color=f"C{i}", label=LABELS[method])
            ax.fill_between(
                steps,
                [m - s for m, s in zip(mean, sd, strict=True)],
                [m + s for m, s in zip(mean, sd, strict=True)],
                color=f"C{i}",
                alpha=0.15,
            )
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("optimizer step (refresh)")
        ax.set_ylabel("edge F1 vs planted graph")
        ax.set_title(f"{problem}: conflict-graph recovery (mean ± std over seeds)", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        name = f"edge_f1_{problem}.png"
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append(name)
    return files


def toy_trajectories(toy: list[Record], out: Path) -> list[str]:
    """One figure per method: the five trajectories in loss space and in parameter space."""
    from benchmarks.quality.toy import FRONT_X2, pareto_front

    plt = _plt()
    front = pareto_front().numpy()
    files = []
    for t in toy:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
        a1.plot(front[:, 0], front[:, 1], "-", lw=6, color="#9a9aa0", label="Pareto front")
        a2.plot([-7, 7], [FRONT_X2, FRONT_X2], "-", lw=6, color="#9a9aa0", label="Pareto set")
        for i, run in enumerate(t["runs"]):
            ls, xs = run["losses"], run["x"]
            c = f"C{i}"
            a1.plot([p[0] for p in ls], [p[1] for p in ls], "-", lw=1.2, color=c)
            a1.plot(ls[0][0], ls[0][1], "o", color="k", ms=6)
            a1.plot(ls[-1][0], ls[-1][1], "*", color=c, ms=10)
            a2.plot([p[0] for p in xs], [p[1] for p in xs], "-", lw=1.2, color=c)
            a2.plot(xs[0][0], xs[0][1], "o", color="k", ms=6)
            a2.plot(xs[-1][0], xs[-1][1], "*", color=c, ms=10)
        a1.set_xlabel("ℓ1")
        a1.set_ylabel("ℓ2")
        a1.set_title("loss space", fontsize=9)
        a2.set_xlabel("x1")
        a2.set_ylabel("x2")
        a2.set_xlim(-10, 10)
        a2.set_ylim(-10, 10)
        a2.set_title("parameter space", fontsize=9)
        a1.legend(fontsize=8, loc="best")
        fig.suptitle(
            f"{LABELS.get(t['method'], t['method'])}: {t['reached']}/{len(t['runs'])} starts end on the Pareto set",
            fontsize=11,
        )
        name = f"toy_{t['method']}.png"
        fig.savefig(out / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
        files.append(name)
    return files


def write_all(records: list[Record], toy: list[Record], out: Path) -> list[str]:
    """Every figure into ``out``; the list of file names."""
    out.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    files += accuracy_vs_time(records, out)
    files += interference_heatmaps(records, out)
    files += schedule_timelines(records, out)
    files += edge_f1_over_training(records, out)
    files += toy_trajectories(toy, out)
    return files
