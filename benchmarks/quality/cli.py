"""Command line: ``python -m benchmarks.quality [--quick] [--out DIR] ...``.

Writes into ``--out``: ``results.md`` (tables, figures linked by relative path) and
``results.json`` (every run: final metrics, curves, times, SON-GOKU traces); the PNG figures go to
``--figures`` (unless ``--no-figures`` or matplotlib is missing). With the default ``--out`` the
figures go to ``docs/assets/quality``, where the documentation serves them: they are committed
once. With another ``--out`` they go next to ``results.md``. With ``--merge`` the new runs are added to the ``results.json`` already in ``--out``
(a run of the same problem, method and seed replaces the old one) and everything is rewritten
from the merged set, so a few methods can be added without re-running the others.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._progress import Progress, add_progress_arg
from benchmarks.quality import figures, report
from benchmarks.quality.methods import (
    ADAM_BETAS,
    CONTROLS,
    METHODS,
    SONGOKU_FAMILY,
    MethodConfig,
)
from benchmarks.quality.runner import RunSpec, default_jobs, run_sweep, single_thread
from benchmarks.quality.toy import run_toy

__all__ = ["FULL", "QUICK", "main", "merge_results"]

# problem -> (steps, lr, eval_every, problem kwargs)
FULL: dict[str, tuple[int, float, int, dict[str, Any]]] = {
    "multidigits": (400, 3e-3, 25, {}),
    "planted_k6": (300, 1e-2, 25, {}),
    "planted_k16": (300, 1e-2, 25, {}),
    "diabetes": (200, 1e-3, 20, {}),
    # the tuned protocol's additional problems (benchmarks.quality.problems_extra)
    "diabetes_scaled": (200, 1e-3, 20, {}),
    "planted_fixed_sign": (300, 1e-2, 25, {}),
    "overlap_digits": (800, 5e-3, 50, {}),
    "multi_fashion": (1200, 5e-3, 50, {}),
}
PROTOCOL_ONLY = ("diabetes_scaled", "planted_fixed_sign", "overlap_digits", "multi_fashion")
QUICK: dict[str, tuple[int, float, int, dict[str, Any]]] = {
    "multidigits": (16, 3e-3, 8, {"n_train": 400, "n_test": 200}),
    "planted_k6": (16, 1e-2, 8, {"n_test": 500}),
    "planted_k16": (16, 1e-2, 8, {"n_test": 500}),
    "diabetes": (16, 1e-3, 8, {}),
    "diabetes_scaled": (16, 1e-3, 8, {}),
    "planted_fixed_sign": (16, 1e-2, 8, {"n_test": 500}),
    "overlap_digits": (16, 5e-3, 8, {"n_train": 400, "n_test": 200}),
    "multi_fashion": (16, 5e-3, 8, {"n_train": 400, "n_test": 200}),
}
# the tuned protocol: problem -> validation samples (full, quick)
N_VAL: dict[str, tuple[int, int]] = {
    "multidigits": (500, 200),
    "planted_k6": (500, 200),
    "planted_k16": (500, 200),
    "diabetes": (44, 44),
    "diabetes_scaled": (44, 44),
    "planted_fixed_sign": (500, 200),
    "overlap_digits": (500, 200),
    "multi_fashion": (1000, 200),
}
QUICK_PROTOCOL = (
    ["planted_k6", "diabetes"],
    ["uniform", "pcgrad", "songoku", "songoku_oracle", "songoku_random"],
)
# the tuned protocol's full budgets: problem -> (steps, eval_every), long enough for Uniform's
# validation curve to flatten (the fixed-lr budgets above stop before Uniform converges)
PROTOCOL_STEPS: dict[str, tuple[int, int]] = {
    "multidigits": (1200, 50),
    "planted_k6": (600, 25),
    "planted_k16": (600, 25),
    "diabetes": (400, 20),
    "diabetes_scaled": (400, 20),
    "planted_fixed_sign": (600, 25),
    "overlap_digits": (2000, 100),
    "multi_fashion": (3000, 150),
}
# the tuned protocol's methods: every method once, GCond as its guide recommends (Adam β1 = 0);
# the fixed-lr benchmark's ablations (GCond's other optimizer couplings, the static one-shot
# colouring, β = 0) stay there
PROTOCOL_METHODS: tuple[str, ...] = tuple(
    m for m in METHODS if m not in ("gcond", "gcond_stoch", "gcond_nomom", "static", "single_step")
)
DEFAULT_OUT = Path("benchmarks/results/quality")
PROTOCOL_OUT = Path("benchmarks/results/quality_protocol")
PROTOCOL_FIGURES = Path("docs/assets/quality_protocol")  # the protocol's, with its default --out
DEFAULT_FIGURES = Path("docs/assets/quality")  # served by the docs; results.md links to them


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__)
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"tiny budgets, 1 seed (under a minute; default --out {DEFAULT_OUT / 'quick'})",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    p.add_argument("--problems", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (quick 1, full 5)")
    p.add_argument("--steps", type=int, default=None, help="override the optimizer steps")
    p.add_argument("--lr", type=float, default=None, help="override the Adam learning rate")
    p.add_argument(
        "--refresh-period", type=int, default=None, help="SON-GOKU R (quick 16, full 32)"
    )
    p.add_argument("--toy", dest="toy", action="store_true", default=True)
    p.add_argument("--no-toy", dest="toy", action="store_false", help="skip the 2-task toy")
    p.add_argument("--toy-steps", type=int, default=None, help="toy steps (quick 10, full 400)")
    p.add_argument("--no-figures", action="store_true", help="write no PNG figures")
    p.add_argument(
        "--figures",
        type=Path,
        default=None,
        help=f"figure folder (default: {DEFAULT_FIGURES}, with --protocol {PROTOCOL_FIGURES}, "
        "with the default --out, else --out)",
    )
    p.add_argument(
        "--jobs", type=int, default=None, help="worker processes (default: min(2, cpus))"
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="add the new runs to --out/results.json (same problem, method and seed: replaced) "
        "and rewrite results.md and the figures from the merged set",
    )
    p.add_argument(
        "--protocol",
        action="store_true",
        help="tuned protocol: validation split, lr sweep selected on validation, single-task "
        f"baselines, paired intervals (default --out {PROTOCOL_OUT}, with --quick "
        f"{PROTOCOL_OUT / 'quick'})",
    )
    p.add_argument("--lr-points", type=int, default=3, help="protocol: lr grid size (default 3)")
    p.add_argument(
        "--lr-span", type=float, default=10.0, help="protocol: grid max/min ratio (default 10)"
    )
    p.add_argument("--lrs", default=None, help="protocol: explicit comma-separated lr grid")
    p.add_argument(
        "--lr-extend",
        type=int,
        default=None,
        help="protocol: at most this many points added beyond a selected grid edge "
        "(quick 1, full 2)",
    )
    p.add_argument("--tie-rel", type=float, default=1e-6, help="protocol: relative tie tolerance")
    p.add_argument(
        "--no-single-task", action="store_true", help="protocol: no single-task baselines (no Δm)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="protocol: reuse the runs already recorded in --out/runs.jsonl (same spec), run "
        "only the others",
    )
    p.add_argument(
        "--replot",
        action="store_true",
        help="train nothing: rewrite results.md and the figures from --out/results.json",
    )
    add_progress_arg(p)
    return p


def _subset(arg: str | None, allowed: list[str] | tuple[str, ...], what: str) -> list[str]:
    if arg is None:
        return list(allowed)
    chosen = [a.strip() for a in arg.split(",") if a.strip()]
    bad = [a for a in chosen if a not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {bad}; expected some of {list(allowed)}")
    return chosen


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns ``{"records", "toy", "files"}``."""
    args = _parser().parse_args(argv)
    if args.protocol:
        from benchmarks.quality.protocol_run import run_protocol

        return run_protocol(args)
    if args.quick and args.out == DEFAULT_OUT:  # a smoke run never overwrites the committed results
        args.out = DEFAULT_OUT / "quick"
    if args.figures is None:
        args.figures = DEFAULT_FIGURES if args.out == DEFAULT_OUT else args.out
    if args.replot:
        return _replot(args.out, not args.no_figures, args.figures)
    if args.merge and not (args.out / "results.json").is_file():
        raise SystemExit(f"--merge: no results.json in {args.out}")
    table = QUICK if args.quick else FULL
    problems = _subset(args.problems, list(table), "problems")
    if args.problems is None:  # the fixed-lr benchmark keeps its problems
        problems = [p for p in problems if p not in PROTOCOL_ONLY]
    methods = _subset(args.methods, METHODS, "methods")
    if args.methods is None:  # the protocol's additions stay out of the fixed-lr benchmark
        methods = [m for m in methods if m not in (*CONTROLS, "songoku_refresh_ema")]
    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 5)
    seeds = list(range(n_seeds))
    r_period = args.refresh_period or (8 if args.quick else 32)
    cfg = MethodConfig(refresh_period=r_period)
    jobs = args.jobs if args.jobs is not None else default_jobs()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args, table, problems, methods, seeds, cfg, jobs)
    finally:
        torch.set_num_threads(threads)


def _run(args, table, problems, methods, seeds, cfg, jobs) -> dict[str, Any]:
    r_period = cfg.refresh_period

    specs = []
    for seed in seeds:  # seeds outermost: machine noise spreads over all methods
        for problem in problems:
            steps, lr, every, kwargs = table[problem]
            steps = args.steps or steps
            lr = args.lr or lr
            for method in methods:
                specs.append(
                    RunSpec(
                        problem=problem,
                        method=method,
                        seed=seed,
                        steps=steps,
                        lr=lr,
                        eval_every=min(every, steps),
                        problem_kwargs=kwargs,
                        method_config=cfg,
                        keep_trace=seed == seeds[0] and method in SONGOKU_FAMILY,
                        probe_points=5 if seed == seeds[0] and method == "uniform" else 0,
                    )
                )
    t0 = time.perf_counter()
    records = run_sweep(specs, jobs=jobs, progress=args.progress)
    toy: list[dict[str, Any]] = []
    toy_steps = args.toy_steps or (10 if args.quick else 400)
    if args.toy:
        toy = _run_toys(methods, toy_steps, jobs, args.progress)
    total = time.perf_counter() - t0

    settings = {
        "mode": "quick" if args.quick else "full",
        "seeds": seeds,
        "problems": {
            p: {"steps": args.steps or table[p][0], "lr": args.lr or table[p][1]} for p in problems
        },
        "optimizer": _optimizer_note(methods),
        "SON-GOKU": f"R = {r_period}, tau = {cfg.tau} (constant), beta = {cfg.ema_beta}, EMA of the active tasks",
        "GCond": f"classic N = {cfg.gcond_classic_microbatches} micro-batches, stochastic N = K; "
        "library defaults otherwise",
        "CAGrad": f"c = {cfg.cagrad_c}",
        "toy": f"{toy_steps} steps, Adam lr 7e-2 (lr/10 for the last fifth), SON-GOKU R = 10",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads per run": 1,
        "worker processes": jobs,
        "sweep wall-clock s": round(total, 1),
        "methods": methods,
    }
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        old = json.loads((out / "results.json").read_text())
        settings, records, toy = merge_results(old, settings, records, toy)
    (out / "results.json").write_text(
        json.dumps({"settings": settings, "records": records, "toy": toy}, allow_nan=True)
    )
    return _write(out, records, toy, settings, not args.no_figures, args.figures)


def _optimizer_note(methods: list[str]) -> str:
    note = "Adam (torch defaults besides lr)"
    special = [m for m in methods if m in ADAM_BETAS]
    if special:
        note += "; " + ", ".join(f"{m}: betas={ADAM_BETAS[m]}" for m in special)
    return note


def merge_results(
    old: dict[str, Any],
    settings: dict[str, Any],
    records: list[dict[str, Any]],
    toy: list[dict[str, Any]],
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Merge a new sweep into an old ``results.json`` payload.

    The budgets must agree (same mode; same steps and lr for every problem both ran). A new record
    replaces an old one of the same ``(problem, method, seed)``, a new toy run the old one of its
    method; the old order is kept and new entries are appended. Returns ``(settings, records,
    toy)``; the settings are the old ones with the methods, problems and seeds of both, the
    optimizer note of every method and a ``merged runs`` log.
    """
    prev = old["settings"]
    if prev.get("mode") != settings["mode"]:
        raise SystemExit(
            f"--merge: mode {settings['mode']!r} != {prev.get('mode')!r} in results.json"
        )
    for name, budget in settings["problems"].items():
        known = prev["problems"].get(name)
        if known is not None and known != budget:
            raise SystemExit(f"--merge: {name} budget {budget} != {known} in results.json")

    def key(r: dict[str, Any]) -> tuple[str, str, int]:
        return (r["problem"], r["method"], r["seed"])

    new_keys = {key(r) for r in records}
    merged = [r for r in old["records"] if key(r) not in new_keys] + list(records)
    new_toys = {t["method"] for t in toy}
    merged_toy = [t for t in old["toy"] if t["method"] not in new_toys] + list(toy)
    present = {r["method"] for r in merged} | {t["method"] for t in merged_toy}
    methods = [m for m in METHODS if m in present]
    out = dict(prev)
    out["problems"] = {**prev["problems"], **settings["problems"]}
    out["seeds"] = sorted(set(prev["seeds"]) | set(settings["seeds"]))
    out["methods"] = methods
    out["optimizer"] = _optimizer_note(methods)
    log = {k: settings[k] for k in ("methods", "seeds", "sweep wall-clock s", "worker processes")}
    log["problems"] = list(settings["problems"])
    out["merged runs"] = [*prev.get("merged runs", []), log]
    return out, merged, merged_toy


def _write(
    out: Path,
    records: list[dict[str, Any]],
    toy: list[dict[str, Any]],
    settings: dict[str, Any],
    with_figures: bool,
    figure_dir: Path,
) -> dict[str, Any]:
    files: list[str] = []
    # the toy table follows the method order (a merge appends its runs at the end)
    toy = sorted(toy, key=lambda t: METHODS.index(t["method"]) if t["method"] in METHODS else 99)
    if with_figures:
        if figures.available():
            files = figures.write_all(records, toy, figure_dir)
        else:
            print("matplotlib is not installed: no figures")
    methods = settings.get("methods") or sorted(
        {r["method"] for r in records} | {t["method"] for t in toy}, key=METHODS.index
    )
    rel = Path(os.path.relpath(figure_dir, out))  # results.md links the figures where they are
    links = [(rel / f).as_posix() for f in files]
    (out / "results.md").write_text(report.markdown_report(records, toy, methods, settings, links))
    print(f"wrote {out / 'results.md'} ({len(records)} runs, {len(files)} figures)")
    return {"records": records, "toy": toy, "files": files, "settings": settings}


def _replot(out: Path, with_figures: bool, figure_dir: Path) -> dict[str, Any]:
    data = json.loads((out / "results.json").read_text())
    return _write(out, data["records"], data["toy"], data["settings"], with_figures, figure_dir)


def _toy_one(args: tuple[str, int]) -> dict[str, Any]:
    method, steps = args
    return run_toy(method, steps=steps)


def _run_toys(
    methods: list[str], steps: int, jobs: int, progress: bool | None = None
) -> list[dict[str, Any]]:
    work = [(m, steps) for m in methods]
    results: list[dict[str, Any]] = []
    with Progress(len(work), "quality toy", enable=progress) as bar:
        if jobs <= 1:
            for w in work:
                results.append(_toy_one(w))
                bar.update()
        else:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=jobs, initializer=single_thread) as pool:
                for t in pool.map(_toy_one, work):
                    results.append(t)
                    bar.update()
    for t in results:
        print(f"toy {t['method']:<15} on front {t['reached']}/5  ({t['time_s']:.2f} s)")
    return results
