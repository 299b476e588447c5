"""Training loop and the sweep over problems × methods × seeds.

One run: ``steps`` optimizer steps of Adam (same learning rate for every method; torch's default
betas unless the method's stepper asks for others, see :data:`~benchmarks.quality.methods.ADAM_BETAS`)
on mini-batches drawn from a generator seeded by the run's seed, so every method sees the same
batches. Only the
method's gradient computation and the optimizer step are timed (``time.perf_counter``); held-out
evaluations, the interference probes and the bookkeeping of the traces are not.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from benchmarks._progress import Progress
from benchmarks.quality.methods import SONGOKU_FAMILY, MethodConfig, build_method
from benchmarks.quality.problems import Problem, build_problem
from gradfn import tree, value_and_per_task_grads

__all__ = ["RunSpec", "edge_f1", "interference", "run_one", "run_sweep", "train"]


@dataclass
class RunSpec:
    """One training run (picklable, so that runs can go to worker processes)."""

    problem: str
    method: str
    seed: int
    steps: int
    lr: float
    eval_every: int
    problem_kwargs: dict[str, Any] = field(default_factory=dict)
    method_config: MethodConfig = field(default_factory=MethodConfig)
    keep_trace: bool = False
    probe_points: int = 0
    select_on_val: bool = False  # protocol: curves on validation, test once at the best one


def edge_f1(pred: Any, truth: torch.Tensor) -> float:
    """F1 of the predicted conflict edges (upper triangle) against the planted ones."""
    p = torch.as_tensor(pred, dtype=torch.bool)
    iu = torch.triu_indices(truth.shape[0], truth.shape[0], offset=1)
    p, t = p[iu[0], iu[1]], truth[iu[0], iu[1]]
    tp = float((p & t).sum())
    fp = float((p & ~t).sum())
    fn = float((~p & t).sum())
    if tp + fp + fn == 0:
        return 1.0
    return 2 * tp / (2 * tp + fp + fn)


def interference(problem: Problem, params: dict[str, torch.Tensor]) -> list[list[float]]:
    """``ρ = −cos`` between the tasks' shared gradients on the problem's probe batch (K×K), with
    a zero diagonal (as SON-GOKU's interference matrix)."""
    _, grads = value_and_per_task_grads(problem.loss_fn, params, problem.probe, wrt=problem.shared)
    g = tree.gramian(grads, dtype=torch.float64)
    norms = g.diagonal().clamp_min(1e-30).sqrt()
    rho = -(g / norms[:, None] / norms[None, :])
    return rho.fill_diagonal_(0.0).tolist()


def selection_metric(problem: Problem, method: str) -> tuple[str, bool]:
    """``(metric, higher_is_better)`` a run is selected on: the headline, or for the single-task
    baseline ``stl_k`` its task's metric."""
    if method.startswith("stl_"):
        k = int(method[4:])
        return problem.task_metrics[k], problem.task_higher[k]
    return problem.headline, problem.higher_is_better


def train(problem: Problem, spec: RunSpec) -> dict[str, Any]:
    """Train one method on one problem; return final metrics, time and curves.

    With ``spec.select_on_val`` the curve holds validation metrics only and the test metrics are
    read once, at the checkpoint of the best validation metric (the earliest on ties)."""
    select = spec.select_on_val
    if select and problem.validate is None:
        raise ValueError(f"{spec.problem}: select_on_val needs a validation split (n_val > 0)")
    key, higher = selection_metric(problem, spec.method)
    best: tuple[float, int, dict[str, Any]] | None = None
    stepper = build_method(spec.method, problem, spec.seed, spec.method_config)
    params = {n: p.clone() for n, p in problem.params.items()}
    opt = torch.optim.Adam(list(params.values()), lr=spec.lr, betas=stepper.adam_betas)
    gen = torch.Generator().manual_seed(10_000 + spec.seed)
    probe_at = (
        {round(i * spec.steps / (spec.probe_points - 1)) for i in range(spec.probe_points)}
        if spec.probe_points > 1 and problem.probe is not None
        else set()
    )
    curve: list[dict[str, float]] = []
    probes: list[dict[str, Any]] = []
    exact: list[list[list[float]]] = []  # ρ of the full-batch gradients at each refresh
    elapsed = 0.0
    nonfinite = False
    for t in range(spec.steps):
        if t in probe_at:
            probes.append({"step": t, "rho": interference(problem, params)})
        batch = problem.sample(gen)
        t0 = time.perf_counter()
        grads = stepper(params, batch)
        elapsed += time.perf_counter() - t0
        refreshes = stepper.trace.get("refresh")
        if refreshes and len(exact) < len(refreshes) and problem.probe is not None:
            # the exact full-batch graph at the refresh's parameters (untimed)
            exact.append(interference(problem, params))
        t0 = time.perf_counter()
        for n, p in params.items():
            p.grad = grads[n]
        opt.step()
        elapsed += time.perf_counter() - t0
        if (t + 1) % spec.eval_every == 0 or t + 1 == spec.steps:
            if select:
                assert problem.validate is not None
                v = problem.validate(params)
                curve.append({"step": t + 1, "time": elapsed, f"val_{key}": v[key]})
                score = v[key] if higher else -v[key]
                if (
                    best is None
                    or score > best[0]
                    or (math.isnan(best[0]) and not math.isnan(score))
                ):
                    best = (score, t + 1, {"params": _copy(params), "val": v})
            else:
                m = problem.evaluate(params)
                curve.append(
                    {"step": t + 1, "time": elapsed, problem.headline: m[problem.headline]}
                )
    if spec.steps in probe_at:
        probes.append({"step": spec.steps, "rho": interference(problem, params)})
    # the test split, read once (at the best-validation checkpoint when selecting)
    final = problem.evaluate(params if best is None else best[2]["params"])
    nonfinite = any(not math.isfinite(v) for v in final.values())
    out: dict[str, Any] = {
        "problem": spec.problem,
        "method": spec.method,
        "seed": spec.seed,
        "steps": spec.steps,
        "time_s": elapsed,
        "ms_per_step": 1000.0 * elapsed / max(1, spec.steps),
        "adam_betas": list(opt.defaults["betas"]),
        "metrics": final,
        "nonfinite": nonfinite,
        "curve": curve,
    }
    if best is not None:
        out.update(lr=spec.lr, selected_step=best[1], val_metrics=best[2]["val"])
        out.update(select_metric=key, select_higher=higher)
    if probes:
        out["probes"] = probes
    if spec.method in SONGOKU_FAMILY:
        refreshes = stepper.trace["refresh"]
        out["groups"] = [r["num_groups"] for r in refreshes]
        out["refresh_steps"] = [r["step"] for r in refreshes]
        if problem.planted_adjacency is not None:
            out["edge_f1"] = [edge_f1(r["adjacency"], problem.planted_adjacency) for r in refreshes]
        if exact:  # the same τ as the refresh
            out["edge_f1_exact"] = [
                edge_f1(r["adjacency"], torch.tensor(rho) > r["tau"])
                for r, rho in zip(refreshes, exact, strict=True)
            ]
        part = problem.notes.get("group_of_task")
        if part is not None:
            from sklearn.metrics import adjusted_rand_score

            out["ari"] = [float(adjusted_rand_score(part, r["labels"])) for r in refreshes]
        if spec.keep_trace:
            out["active"] = stepper.trace["active"]
            out["rho"] = [{"step": r["step"], "rho": r["rho"]} for r in refreshes]
    return out


def _copy(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Build the problem for ``spec.seed`` and train (the unit of work of a worker process)."""
    problem = build_problem(spec.problem, spec.seed, **spec.problem_kwargs)
    record = train(problem, spec)
    record["task_names"] = problem.task_names
    record["headline"] = problem.headline
    record["higher_is_better"] = problem.higher_is_better
    record["task_metrics"] = problem.task_metrics
    record["task_higher"] = problem.task_higher
    record["method_config"] = asdict(spec.method_config)
    return record


def run_sweep(
    specs: Iterable[RunSpec],
    jobs: int = 1,
    log: Any = print,
    progress: bool | None = None,
    on_record: Callable[[RunSpec, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every spec (in ``jobs`` worker processes when ``jobs > 1``), in order; a progress bar
    on stderr counts the runs (``progress``: None, when stderr is a terminal); ``on_record(spec,
    record)`` is called as each run's record arrives (in spec order)."""
    specs = list(specs)
    with Progress(len(specs), "quality runs", enable=progress) as bar:
        return _sweep(specs, jobs, log, bar, on_record)


def _sweep(
    specs: list[RunSpec],
    jobs: int,
    log: Any,
    bar: Progress,
    on_record: Callable[[RunSpec, dict[str, Any]], None] | None,
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []

    def report(i: int, rec: dict[str, Any]) -> None:
        if on_record is not None:
            on_record(specs[i], rec)
        head = rec["metrics"][rec["headline"]]
        log(
            f"[{i + 1}/{len(specs)}] {rec['problem']:<12} {rec['method']:<15} seed {rec['seed']}: "
            f"{rec['headline']} = {head:.4f}  ({rec['time_s']:.2f} s)"
        )

    if jobs <= 1:
        for i, spec in enumerate(specs):
            rec = run_one(spec)
            report(i, rec)
            results.append(rec)
            bar.update()
        return results
    with ProcessPoolExecutor(max_workers=jobs, initializer=single_thread) as pool:
        for i, rec in enumerate(pool.map(run_one, specs)):
            report(i, rec)
            results.append(rec)
            bar.update()
    return results


def single_thread() -> None:
    """Worker initialiser: one intra-op thread per run (runs are timed side by side)."""
    torch.set_num_threads(1)


def default_jobs() -> int:
    return max(1, min(2, os.cpu_count() or 1))
