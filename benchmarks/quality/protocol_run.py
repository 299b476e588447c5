"""``python -m benchmarks.quality --protocol``: the tuned protocol's sweep
(:mod:`benchmarks.quality.protocol`), the grid extension (:mod:`benchmarks.quality.bracket`) and
the report, written to ``results.json`` (settings and summary) / ``results.md``; every run's
record is in ``runs.jsonl``, compressed to ``runs.jsonl.gz`` (the copy to commit)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.quality import bracket, figures, graphs, protocol, views
from benchmarks.quality.cli import (
    DEFAULT_OUT,
    FULL,
    N_VAL,
    PROTOCOL_FIGURES,
    PROTOCOL_METHODS,
    PROTOCOL_OUT,
    PROTOCOL_STEPS,
    QUICK,
    QUICK_PROTOCOL,
    _optimizer_note,
    _subset,
)
from benchmarks.quality.methods import METHODS, MethodConfig
from benchmarks.quality.run_cache import RunCache
from benchmarks.quality.runner import default_jobs

__all__ = ["run_protocol"]


def run_protocol(args: argparse.Namespace) -> dict[str, Any]:
    """The tuned protocol (:mod:`benchmarks.quality.protocol`): writes results.json / .md."""
    from benchmarks.quality.problems import build_problem

    table = QUICK if args.quick else FULL
    # quick: a subset by default, so that it stays under a minute
    problems = _subset(args.problems, list(table), "problems")
    if args.quick and args.problems is None:
        problems = list(QUICK_PROTOCOL[0])
    methods = _subset(args.methods, METHODS, "methods")
    if args.methods is None:
        methods = list(PROTOCOL_METHODS)
    if args.quick and args.methods is None:
        methods = list(QUICK_PROTOCOL[1])
    if "uniform" not in methods:
        methods = ["uniform", *methods]
    seeds = list(range(args.seeds if args.seeds is not None else (2 if args.quick else 5)))
    cfg = MethodConfig(refresh_period=args.refresh_period or (8 if args.quick else 32))
    explicit = [float(x) for x in args.lrs.split(",")] if args.lrs else None
    plan: dict[str, tuple[int, int, dict[str, Any], list[float]]] = {}
    for name in problems:
        steps, lr, every, kwargs = table[name]
        if not args.quick:  # longer budgets: the best-validation checkpoint picks the stop
            steps, every = PROTOCOL_STEPS[name]
        lrs = explicit or protocol.lr_grid(args.lr or lr, args.lr_points, args.lr_span)
        n_val = N_VAL[name][1 if args.quick else 0]
        plan[name] = (args.steps or steps, every, {**kwargs, "n_val": n_val}, lrs)
    built = {}
    for n in problems:
        try:
            built[n] = build_problem(n, 0, **plan[n][2])
        except FileNotFoundError as err:  # Multi-Fashion without its data package
            print(f"skipping {n}: {err}")
            del plan[n]
    problems = list(built)
    num_tasks = {n: p.num_tasks for n, p in built.items()}
    # the oracle-groups control needs a planted partition
    skip = {n: {"songoku_oracle"} for n, p in built.items() if "group_of_task" not in p.notes}
    specs = protocol.protocol_specs(
        plan, methods, seeds, cfg, num_tasks, single_task=not args.no_single_task, skip=skip
    )
    extend = args.lr_extend if args.lr_extend is not None else (1 if args.quick else 2)
    jobs = args.jobs if args.jobs is not None else default_jobs()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out: Path = args.out
    if out == DEFAULT_OUT:  # a smoke run never overwrites the committed results
        out = PROTOCOL_OUT / "quick" if args.quick else PROTOCOL_OUT
    cache = RunCache(out / "runs.jsonl", resume=args.resume)
    t0 = time.perf_counter()
    try:
        records = cache.sweep(specs, jobs=jobs, progress=args.progress)
        base = {n: len(plan[n][3]) for n in problems}
        while extra := bracket.extension_specs(specs, records, base, extend):
            print(f"{len(extra)} runs beyond a selected grid edge")
            specs += extra
            records += cache.sweep(extra, jobs=jobs, progress=args.progress)
    finally:
        torch.set_num_threads(threads)
    settings = {
        "mode": "protocol-quick" if args.quick else "protocol",
        "seeds": seeds,
        "methods": methods,
        "problems": {n: {"steps": plan[n][0], "n_val": plan[n][2]["n_val"]} for n in problems},
        "lr grids": {n: plan[n][3] for n in problems},
        "lr extension": extend,
        "headlines": {n: p.headline for n, p in built.items()},
        "tie_rel": args.tie_rel,
        "tau": cfg.tau,
        "conflict": protocol.conflict_summary(records, cfg.tau),
        "selection": protocol.SELECTION_RULE,
        "optimizer": _optimizer_note(methods),
        "SON-GOKU": f"R = {cfg.refresh_period}, tau = {cfg.tau}, beta = {cfg.ema_beta}",
        "torch": torch.__version__,
        "sweep wall-clock s": round(time.perf_counter() - t0, 1),
    }
    rows = protocol.summarize(records, tie_rel=args.tie_rel)
    chosen = protocol.select(records)
    settings["graphs"] = graphs.graph_rows(chosen)
    settings["equal_time"] = views.equal_time_rows(chosen)
    settings["figures"] = []
    if not args.no_figures:
        if figures.available():
            fig_dir = args.figures or (PROTOCOL_FIGURES if out == PROTOCOL_OUT else out)
            fig_dir.mkdir(parents=True, exist_ok=True)
            names = views.validation_curves(chosen, fig_dir)
            # as the report links them: relative to results.md
            settings["figures"] = [os.path.relpath(fig_dir / n, out) for n in names]
        else:
            print("matplotlib is not installed: no figures")
    payload = {"settings": settings, "records": records, "summary": rows}
    # the records themselves (every run, with its curve and trace) are in runs.jsonl(.gz)
    summary = {"settings": settings, "summary": rows}
    (out / "results.json").write_text(json.dumps(summary, allow_nan=True, indent=1))
    cache.compress()
    (out / "results.md").write_text(protocol.markdown(rows, settings))
    print(f"wrote {out / 'results.md'} ({len(records)} runs)")
    return payload
