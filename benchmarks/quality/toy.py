"""The analytic 2-task toy of the CAGrad and Nash-MTL papers (2-D parameter, no data).

``f1`` and ``f2`` are log-shaped valleys gated by ``tanh(±x₂/2)`` onto quadratic bowls; ``f1`` is
scaled by 0.1 (the Nash-MTL setting), which makes the two gradients very unequal in size. The
Pareto set is the segment ``x₂ ≈ −8.3552``, ``x₁ ∈ [−7, 7]``. Starts: the papers' five points.
The papers run Adam with lr 1e-3 for 35 000 steps; here the budget is scaled to fit a CPU
(default 400 steps: Adam lr 7e-2, then lr 7e-3 for the last ``steps // 5``: a path-length
budget of ~23, enough to reach the front from every start, and a fine last phase).

A run ends *on the front* when its final point lies on the Pareto set: ``|x₂ + 8.3552| ≤ tol``
and ``x₁ ∈ [−7, 7]`` (the loss surface is very flat along ``x₂``, so a loss-space distance
would call points far from the set "reached"); the loss-space distance is reported too.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor

from benchmarks.quality.methods import MethodConfig, build_method
from benchmarks.quality.problems import Problem

__all__ = ["STARTS", "pareto_front", "run_toy", "toy_losses", "toy_problem"]

STARTS: tuple[tuple[float, float], ...] = (
    (-8.5, 7.5),
    (0.0, 0.0),
    (9.0, 9.0),
    (-7.5, -0.5),
    (9.0, -1.0),
)
FRONT_X2 = -8.3552
SCALE = 0.1
_LOWER = 5e-6


def toy_losses(x: Tensor, scale: float = SCALE) -> Tensor:
    """``(f1, f2)`` at ``x`` (``(..., 2)``), shape ``(..., 2)``."""
    x1, x2 = x[..., 0], x[..., 1]
    log1 = (0.5 * (-x1 - 7) - torch.tanh(-x2)).abs().clamp_min(_LOWER).log() + 6
    log2 = (0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs().clamp_min(_LOWER).log() + 6
    up = torch.tanh(0.5 * x2).clamp_min(0)
    down = torch.tanh(-0.5 * x2).clamp_min(0)
    sq1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    sq2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    f1 = (log1 * up + sq1 * down) * scale
    f2 = log2 * up + sq2 * down
    return torch.stack([f1, f2], dim=-1)


def pareto_front(n: int = 1000) -> Tensor:
    """``(n, 2)`` loss pairs along the Pareto set."""
    x1 = torch.linspace(-7, 7, n, dtype=torch.float64)
    return toy_losses(torch.stack([x1, torch.full_like(x1, FRONT_X2)], dim=-1))


def toy_problem(start: tuple[float, float]) -> Problem:
    """The toy as a :class:`Problem` with one shared parameter ``trunk.x`` and no data."""

    def loss_fn(params: dict[str, Tensor], batch: Any) -> list[Tensor]:
        f = toy_losses(params["trunk.x"])
        return [f[0], f[1]]

    def evaluate(params: dict[str, Tensor]) -> dict[str, float]:
        f = toy_losses(params["trunk.x"].double())
        return {"f1": float(f[0]), "f2": float(f[1])}

    return Problem(
        name="toy",
        task_names=["f1", "f2"],
        primary=[0, 1],
        params={"trunk.x": torch.tensor(start, dtype=torch.float32)},
        loss_fn=loss_fn,
        sample=lambda gen: None,
        evaluate=evaluate,
        headline="f1",
        higher_is_better=False,
        batch_size=0,
    )


def run_toy(
    method: str,
    *,
    steps: int = 400,
    lr: float = 7e-2,
    record_every: int = 5,
    tol: float = 0.2,
    cfg: MethodConfig | None = None,
) -> dict[str, Any]:
    """Trajectories of ``method`` from the five starts: parameters and losses every
    ``record_every`` steps, final distance to the front, time."""
    front = pareto_front()
    cfg = cfg or MethodConfig(refresh_period=10)
    runs = []
    elapsed = 0.0
    for i, start in enumerate(STARTS):
        problem = toy_problem(start)
        stepper = build_method(method, problem, i, cfg)
        params = {n: p.clone() for n, p in problem.params.items()}
        opt = torch.optim.Adam(list(params.values()), lr=lr, betas=stepper.adam_betas)
        xs = [params["trunk.x"].tolist()]
        for t in range(steps):
            if t == steps - steps // 5:
                for group in opt.param_groups:
                    group["lr"] = lr / 10
            t0 = time.perf_counter()
            grads = stepper(params, None)
            for n, p in params.items():
                p.grad = grads[n]
            opt.step()
            elapsed += time.perf_counter() - t0
            if (t + 1) % record_every == 0 or t + 1 == steps:
                xs.append(params["trunk.x"].tolist())
        traj = torch.tensor(xs, dtype=torch.float64)
        losses = toy_losses(traj)
        dist = float(torch.cdist(losses[-1:], front).min())
        x1, x2 = traj[-1].tolist()
        on_front = abs(x2 - FRONT_X2) <= tol and -7.0 <= x1 <= 7.0
        runs.append(
            {
                "start": list(start),
                "x": traj.tolist(),
                "losses": losses.tolist(),
                "final_distance": dist if math.isfinite(dist) else float("nan"),
                "on_front": bool(on_front),
            }
        )
    return {
        "method": method,
        "steps": steps,
        "lr": lr,
        "adam_betas": list(opt.defaults["betas"]),
        "time_s": elapsed,
        "ms_per_step": 1000.0 * elapsed / (steps * len(STARTS)),
        "runs": runs,
        "reached": sum(r["on_front"] for r in runs),
    }
