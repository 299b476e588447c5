"""Matplotlib figures of SON-GOKU's decisions (arXiv:2509.16959): the interference matrix
``ρ = −cos`` with its threshold ``τ``, and the schedule timeline. Drawn on a bare
``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, no global state), and rasterised to
``(3, H, W)`` uint8 tensors for TensorBoard's ``add_image``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["EXTRA", "figure_to_image", "interference_figure", "require", "schedule_figure"]

EXTRA = "pip install 'gradfn[tensorboard]'"

# a qualitative palette (Okabe–Ito, colour-blind safe) for the groups of the timeline
PALETTE = (
    (0.902, 0.624, 0.000),
    (0.337, 0.706, 0.914),
    (0.000, 0.620, 0.451),
    (0.941, 0.894, 0.259),
    (0.000, 0.447, 0.698),
    (0.835, 0.369, 0.000),
    (0.800, 0.475, 0.655),
    (0.400, 0.400, 0.400),
)
INACTIVE = (1.0, 1.0, 1.0)
SKIPPED = (0.85, 0.85, 0.85)


def require(module: str) -> Any:
    """Import ``module`` (matplotlib, tensorboard), or an ImportError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"gradfn's TensorBoard images need `{module.split('.')[0]}`: {EXTRA}"
        ) from err


def _figure(width: float, height: float) -> Any:
    require("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def figure_to_image(fig: Any) -> Tensor:
    """A matplotlib figure rendered to a ``(3, H, W)`` uint8 tensor (CHW, RGB)."""
    canvas = fig.canvas
    canvas.draw()
    rgba = torch.frombuffer(bytearray(canvas.buffer_rgba()), dtype=torch.uint8)
    w, h = canvas.get_width_height()
    return rgba.reshape(h, w, 4)[..., :3].permute(2, 0, 1).contiguous()


def _names(task_names: Sequence[str] | None, k: int) -> list[str]:
    from gradfn.integrations.logging import _task_names

    return _task_names(task_names, k)


def interference_figure(
    rho: Tensor,
    tau: float,
    conflict: Tensor,
    task_names: Sequence[str] | None = None,
    title: str = "",
) -> Any:
    """The ``(K, K)`` interference matrix ``ρ_ij = −cos(e_i, e_j)`` as a heat-map.

    Diverging colours on ``[−1, 1]`` (red: ``ρ > 0``, gradients opposed; blue: aligned), the
    value in each cell, the diagonal grey; ``conflict`` ``(K, K)`` bool cells (edges of the
    conflict graph, ``ρ > τ``) get a black frame and ``τ`` is marked on the colour bar.
    """
    from matplotlib.patches import Rectangle

    k = rho.shape[0]
    names = _names(task_names, k)
    values = rho.detach().to("cpu", torch.float64)
    edges = conflict.detach().to("cpu", torch.bool)
    grid = values.clone()
    grid.fill_diagonal_(float("nan"))
    size = 1.6 + 0.55 * k
    fig = _figure(size + 1.0, size)
    ax = fig.add_axes((0.16, 0.14, 0.62, 0.72))
    cmap = require("matplotlib").colormaps["RdBu_r"].with_extremes(bad=(0.75, 0.75, 0.75))
    im = ax.imshow(grid.numpy(), cmap=cmap, vmin=-1.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            if i == j:
                continue
            v = float(values[i, j])
            ax.text(
                j,
                i,
                f"{v:+.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if abs(v) > 0.6 else "black",
            )
            if bool(edges[i, j]):
                ax.add_patch(
                    Rectangle((j - 0.46, i - 0.46), 0.92, 0.92, fill=False, lw=2.2, ec="black")
                )
    ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    n_edges = int(torch.triu(edges, diagonal=1).sum())
    ax.set_title(
        f"{title}interference ρ = −cos, τ = {tau:.3g}\n{n_edges} conflict edge(s) (framed: ρ > τ)",
        fontsize=9,
    )
    cax = fig.add_axes((0.82, 0.14, 0.04, 0.72))
    bar = fig.colorbar(im, cax=cax)
    bar.set_label("ρ (black line: τ)", fontsize=8)
    if tau == tau and -1.0 <= tau <= 1.0:  # not NaN (before the first refresh)
        bar.ax.axhline(tau, color="black", lw=2.5)
    return fig


def schedule_colors(active: Tensor, skipped: Tensor) -> Tensor:
    """``(K, n, 3)`` float RGB of a ``(n, K)`` bool timeline: each distinct set of active tasks
    gets a colour of the palette (in order of first appearance), inactive cells are white, and
    every task of a skipped step light grey."""
    n, k = active.shape
    rgb = torch.tensor(INACTIVE, dtype=torch.float64).repeat(k, n, 1)
    seen: dict[tuple[bool, ...], int] = {}
    for s in range(n):
        if bool(skipped[s]):
            rgb[:, s] = torch.tensor(SKIPPED, dtype=torch.float64)
            continue
        key = tuple(bool(a) for a in active[s])
        colour = torch.tensor(PALETTE[seen.setdefault(key, len(seen)) % len(PALETTE)])
        rgb[active[s], s] = colour.to(torch.float64)
    return rgb


def schedule_figure(
    steps: Tensor,
    active: Tensor,
    skipped: Tensor,
    refreshed: Tensor,
    task_names: Sequence[str] | None = None,
) -> Any:
    """The schedule timeline: tasks (rows) × recorded steps (columns), a cell coloured when the
    task was in the step's group (one colour per distinct group), grey for a skipped step, a
    dashed line after each step that refreshed the groups.

    ``steps`` ``(n,)`` int, ``active`` ``(n, K)`` bool, ``skipped`` / ``refreshed`` ``(n,)`` bool.
    """
    n, k = active.shape
    names = _names(task_names, k)
    fig = _figure(min(3.0 + 0.09 * n, 16.0), 1.4 + 0.32 * k)
    ax = fig.add_axes((0.14, 0.22, 0.82, 0.62))
    ax.imshow(schedule_colors(active, skipped).numpy(), aspect="auto", interpolation="nearest")
    for s in range(n):
        if bool(refreshed[s]):
            ax.axvline(s + 0.5, color="black", ls="--", lw=1)
    ax.set_yticks(range(k), names, fontsize=8)
    ticks = list(range(0, n, max(1, n // 10)))
    ax.set_xticks(ticks, [str(int(steps[t])) for t in ticks], fontsize=8)
    ax.set_xlabel("step", fontsize=8)
    ax.set_xticks([x + 0.5 for x in range(n - 1)], minor=True)
    ax.set_yticks([y + 0.5 for y in range(k - 1)], minor=True)
    ax.grid(which="minor", color="white", lw=0.5)
    ax.tick_params(which="minor", length=0)
    ax.set_title("schedule: active tasks per step (colour: group; dashed: refresh)", fontsize=9)
    return fig
