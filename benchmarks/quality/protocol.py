"""The tuned protocol (``python -m benchmarks.quality --protocol``): selection and statistics.

* Every problem holds out a validation split; each seed redraws the train / validation / test
  split (``split_seed = seed``) as well as the initialisation and the mini-batches.
* Every method (Uniform and the single-task baselines ``stl_k`` included) runs at every learning
  rate of a log-spaced grid. A run's test metrics are read once, at its best-validation
  checkpoint; a method's learning rate is the one with the best validation metric averaged
  over seeds (the headline; task ``k``'s metric for ``stl_k``). A selection at an edge of the
  grid extends it (:mod:`benchmarks.quality.bracket`); one still at an edge is flagged.
* Against Uniform: per-seed paired differences, their mean with a Student-t 95 % interval, and
  wins / ties / losses (a tie: the two test metrics differ by at most ``tie_rel`` relative,
  bit-identical runs included).
* Δm % (Maninis et al. 2019, arXiv:1904.08918): ``(1/K) Σ_k (−1)^{l_k} (M_m,k − M_b,k) / M_b,k ×
  100``, ``l_k = 1`` where higher is better, ``M_b,k`` the single-task baseline's test metric
  on the same seed (the same split); lower is better. Worst task: ``max_k`` of the same signed relative change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from benchmarks.quality.graphs import graph_table
from benchmarks.quality.methods import LABELS, MethodConfig
from benchmarks.quality.runner import RunSpec
from benchmarks.quality.views import equal_time_table, overview_table

__all__ = [
    "SELECTION_RULE",
    "delta_m",
    "lr_grid",
    "paired_interval",
    "protocol_specs",
    "select",
    "summarize",
    "wins_ties_losses",
]

Record = dict[str, Any]

SELECTION_RULE = (
    "Selection: per method, the learning rate with the best mean validation metric over seeds "
    "(headline; the task's own metric for single-task baselines); each run's test metrics read "
    "once at its best-validation checkpoint. Intervals: paired Student-t 95 % over seeds."
)


def lr_grid(base: float, points: int = 3, span: float = 10.0) -> list[float]:
    """``points`` log-spaced learning rates from ``base/√span`` to ``base·√span``."""
    if points < 1 or not base > 0 or not span >= 1:
        raise ValueError(
            f"lr_grid: need points ≥ 1, base > 0, span ≥ 1 (got {points}, {base}, {span})"
        )
    if points == 1:
        return [base]
    lo = math.log(base) - 0.5 * math.log(span)
    step = math.log(span) / (points - 1)
    return [float(f"{math.exp(lo + i * step):.3g}") for i in range(points)]


def protocol_specs(
    problems: dict[str, tuple[int, int, dict[str, Any], list[float]]],
    methods: Sequence[str],
    seeds: Sequence[int],
    cfg: MethodConfig,
    num_tasks: dict[str, int],
    single_task: bool = True,
    probes: int = 5,
    skip: dict[str, set[str]] | None = None,
) -> list[RunSpec]:
    """Every ``(seed, problem, method, lr)`` run; ``problems[p] = (steps, eval_every, kwargs,
    lrs)`` (kwargs with ``n_val``); the split is redrawn per seed. Uniform's runs probe the
    full-batch interference at ``probes`` evenly spaced steps (:func:`conflict_summary`);
    ``skip[p]``: methods not run on problem ``p``."""
    specs = []
    for seed in seeds:
        for name, (steps, every, kwargs, lrs) in problems.items():
            names = [m for m in methods if m not in (skip or {}).get(name, set())]
            if single_task:
                names += [f"stl_{k}" for k in range(num_tasks[name])]
            for method in names:
                for lr in lrs:
                    specs.append(
                        RunSpec(
                            problem=name,
                            method=method,
                            seed=seed,
                            steps=steps,
                            lr=lr,
                            eval_every=min(every, steps),
                            problem_kwargs={**kwargs, "split_seed": seed},
                            method_config=cfg,
                            keep_trace=False,
                            select_on_val=True,
                            probe_points=probes if method == "uniform" else 0,
                        )
                    )
    return specs


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def select(records: list[Record]) -> dict[tuple[str, str], list[Record]]:
    """``(problem, method) -> the seeds' records at the selected learning rate`` (module rule)."""
    by: dict[tuple[str, str], dict[float, list[Record]]] = {}
    for r in records:
        by.setdefault((r["problem"], r["method"]), {}).setdefault(r["lr"], []).append(r)
    out = {}
    for key, per_lr in by.items():
        best = max(sorted(per_lr), key=lambda lr: _val_score(per_lr[lr]))
        out[key] = sorted(per_lr[best], key=lambda x: x["seed"])
    return out


def _val_score(runs: list[Record]) -> float:
    """Mean validation metric over seeds, higher is better (NaN: worst)."""
    v = _mean([x["val_metrics"][x["select_metric"]] for x in runs])
    v = v if runs[0]["select_higher"] else -v
    return -math.inf if math.isnan(v) else v


def paired_interval(deltas: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the Student-t interval of the mean of paired differences."""
    n = len(deltas)
    m = _mean(deltas)
    if n < 2:
        return m, float("nan"), float("nan")
    from scipy.stats import t as student_t

    sd = math.sqrt(sum((d - m) ** 2 for d in deltas) / (n - 1))
    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return m, m - half, m + half


def wins_ties_losses(
    method: Sequence[float], base: Sequence[float], higher: bool, tie_rel: float = 1e-6
) -> tuple[int, int, int]:
    """Per-seed wins / ties / losses of ``method`` against ``base`` (same seeds, same order); a
    tie: ``|m − b| ≤ tie_rel·|b|`` (bit-identical included)."""
    w = t = lo = 0
    for m, b in zip(method, base, strict=True):
        if m == b or abs(m - b) <= tie_rel * abs(b):
            t += 1
        elif (m > b) == higher:
            w += 1
        else:
            lo += 1
    return w, t, lo


def delta_m(
    metrics: dict[str, float], baseline: dict[str, float], higher: Sequence[bool]
) -> tuple[float, float]:
    """``(Δm %, worst-task %)`` of one run against the per-task baselines (keys in order)."""
    rel = [
        (-1.0 if h else 1.0) * (metrics[k] - b) / b * 100.0
        for (k, b), h in zip(baseline.items(), higher, strict=True)
    ]
    return _mean(rel), max(rel)


def summarize(records: list[Record], tie_rel: float = 1e-6) -> dict[str, list[Record]]:
    """Per problem, one row per method: the selected lr, test headline, vs Uniform and Δm %."""
    from benchmarks.quality.bracket import grid_edges

    chosen = select(records)
    edges = grid_edges(records)
    rows: dict[str, list[Record]] = {}
    for (problem, method), runs in sorted(chosen.items()):
        if method.startswith("stl_"):
            continue
        r0 = runs[0]
        head, higher = r0["headline"], r0["higher_is_better"]
        vals = [r["metrics"][head] for r in runs]
        row: Record = {"method": method, "lr": r0["lr"], "seeds": [r["seed"] for r in runs]}
        row["higher"] = higher
        row["grid_edge"] = edges[(problem, method)]
        row["test"] = (_mean(vals), _sd(vals))
        uni = chosen.get((problem, "uniform"))
        if uni is not None and method != "uniform":
            base = {r["seed"]: r["metrics"][head] for r in uni}
            paired = [
                (v, base[r["seed"]]) for v, r in zip(vals, runs, strict=True) if r["seed"] in base
            ]
            row["vs_uniform"] = paired_interval([v - b for v, b in paired])
            row["wtl"] = wins_ties_losses(
                [v for v, _ in paired], [b for _, b in paired], higher, tie_rel
            )
        stl = {
            int(m[4:]): rs for (p, m), rs in chosen.items() if p == problem and m.startswith("stl_")
        }
        names, senses = r0["task_metrics"], r0["task_higher"]
        if len(stl) == len(names):  # the baselines of the same seed (the same split)
            base_of = {k: {r["seed"]: r["metrics"][names[k]] for r in rs} for k, rs in stl.items()}
            dm = [
                delta_m(
                    r["metrics"], {n: base_of[k][r["seed"]] for k, n in enumerate(names)}, senses
                )
                for r in runs
                if all(r["seed"] in base_of[k] for k in base_of)
            ]
            row["delta_m"] = paired_interval([d for d, _ in dm])
            row["worst_task"] = paired_interval([w for _, w in dm])
        rows.setdefault(problem, []).append(row)
    order = list(LABELS)
    for problem in rows:
        rows[problem].sort(key=lambda x: order.index(x["method"]) if x["method"] in order else 99)
    return rows


def conflict_summary(records: list[Record], tau: float) -> dict[str, Record]:
    """Per problem, from Uniform's full-batch probes (every lr and seed): the distribution of the
    pairwise trunk-gradient cosines, the share of pairs below ``−τ``, the edges of the exact
    conflict graph ``{(i, j): −cos_ij > τ}`` per probe, and ``control`` when no probe has one."""
    out: dict[str, Record] = {}
    for problem in sorted({r["problem"] for r in records}):
        cos: list[float] = []
        edges: list[int] = []
        for r in records:
            if r["problem"] != problem or r["method"] != "uniform":
                continue
            for probe in r.get("probes", []):
                rho = probe["rho"]
                pairs = [-rho[i][j] for i in range(len(rho)) for j in range(i + 1, len(rho))]
                cos += pairs
                edges.append(sum(c < -tau for c in pairs))
        if not cos:
            continue
        srt = sorted(cos)

        def q(f: float, srt: list[float] = srt) -> float:
            return srt[min(len(srt) - 1, int(f * len(srt)))]

        out[problem] = {
            "probes": len(edges),
            "cos_mean": _mean(cos),
            "cos_q10": q(0.1),
            "cos_median": q(0.5),
            "cos_q90": q(0.9),
            "share_below_minus_tau": sum(c < -tau for c in cos) / len(cos),
            "edges_per_probe": edges,
            "control": max(edges) == 0,
        }
    return out


def _edge(row: Record) -> str:
    edge = row.get("grid_edge")
    return "" if edge is None else f" (at grid edge {'↓' if edge == 'low' else '↑'})"


def _sd(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _ci(x: tuple[float, float, float] | None, dec: int = 4) -> str:
    if x is None:
        return "–"
    m, lo, hi = x
    if math.isnan(lo):
        return f"{m:+.{dec}f}"
    return f"{m:+.{dec}f} [{lo:+.{dec}f}, {hi:+.{dec}f}]"


def markdown(rows: dict[str, list[Record]], settings: dict[str, Any]) -> str:
    """The tuned-protocol report: one table per problem, each stating its selection rule."""
    lines = [
        "# Quality benchmark, tuned protocol",
        "",
        f"Seeds {settings['seeds']} (split redrawn per seed); learning-rate grids "
        f"{settings['lr grids']}, extended by up to {settings.get('lr extension', 0)} points "
        "beyond a selected edge (a selection still at an edge is marked *at grid edge*); "
        f"wins/ties/losses per seed, a tie within {settings['tie_rel']:g} "
        "relative. Δm % and worst-task % against the single-task baselines: lower is better.",
    ]
    lines += overview_table(rows, settings.get("conflict", {}))
    stats = settings.get("conflict")
    if stats:
        tau = settings["tau"]
        lines += [
            "",
            "## Conflict statistics",
            "",
            "Pairwise cosines of the tasks' full-batch trunk gradients at Uniform's probes (every "
            f"lr and seed); edges of the exact conflict graph at τ = {tau} (−cos > τ) per probe. "
            "A problem without any edge is a *control*.",
            "",
            "| Problem | probes | cos mean | 10 % | median | 90 % | share < −τ | max edges | role |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for problem, st in stats.items():
            lines.append(
                f"| {problem} | {st['probes']} | {st['cos_mean']:+.3f} | {st['cos_q10']:+.3f} "
                f"| {st['cos_median']:+.3f} | {st['cos_q90']:+.3f} "
                f"| {st['share_below_minus_tau']:.2f} | {max(st['edges_per_probe'])} "
                f"| {'control' if st['control'] else 'conflict'} |"
            )
    graphs = settings.get("graphs", {})
    for problem, table in rows.items():
        head = settings["headlines"][problem]
        lines += [
            "",
            f"## {problem}",
            "",
            SELECTION_RULE,
            "",
            f"| Method | lr | test {head} | Δ vs Uniform [95 % CI] | W/T/L | Δm % [95 % CI] "
            "| worst-task % [95 % CI] |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in table:
            m, sd = row["test"]
            wtl = "/".join(map(str, row["wtl"])) if "wtl" in row else "–"
            lines.append(
                f"| {LABELS.get(row['method'], row['method'])} | {row['lr']:g}{_edge(row)} "
                f"| {m:.4f} ± {sd:.4f} "
                f"| {_ci(row.get('vs_uniform'))} | {wtl} | {_ci(row.get('delta_m'), 2)} "
                f"| {_ci(row.get('worst_task'), 2)} |"
            )
        if settings.get("equal_time", {}).get(problem):
            lines += equal_time_table(settings["equal_time"][problem], head)
        if graphs.get(problem):
            lines += graph_table(graphs[problem])
        figure = f"validation_curves_{problem}.png"
        for path in settings.get("figures", []):
            if path.rsplit("/", 1)[-1] == figure:
                lines += ["", f"![{problem}: validation curves]({path})"]
    return "\n".join(lines) + "\n"
