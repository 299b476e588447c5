"""Markdown tables from the run records (mean ± sample std over seeds)."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

from benchmarks.quality.methods import ADAM_BETAS, LABELS

__all__ = ["headline_table", "markdown_report", "mean_std", "problem_tables", "toy_table"]

Record = dict[str, Any]

PROBLEM_TITLES = {
    "multidigits": "MultiDigits (load_digits, 2 primary + 3 auxiliary tasks)",
    "planted_k6": "Planted conflict groups, K = 6 (3 groups)",
    "planted_k16": "Planted conflict groups, K = 16 (4 groups)",
    "diabetes": "Diabetes (load_diabetes: progression + bmi, s5 auxiliaries)",
}
# extra metrics shown next to the headline one in the headline table
HEADLINE_EXTRA = {"planted_k6": ["worst_rel_mse"], "planted_k16": ["worst_rel_mse"]}
# (metric key, column title, scale, decimals)
COLUMNS: dict[str, list[tuple[str, str, float, int]]] = {
    "multidigits": [
        ("primary_acc", "primary acc % ↑", 100, 2),
        ("acc_left", "left %", 100, 1),
        ("acc_right", "right %", 100, 1),
        ("acc_parity", "parity %", 100, 1),
        ("acc_ge5", "≥5 %", 100, 1),
        ("acc_shuffled", "shuffled %", 100, 1),
    ],
    "planted_k6": [
        ("mean_rel_mse", "mean rel. MSE ↓", 1, 3),
        ("worst_rel_mse", "worst-task rel. MSE ↓", 1, 3),
    ],
    "planted_k16": [
        ("mean_rel_mse", "mean rel. MSE ↓", 1, 3),
        ("worst_rel_mse", "worst-task rel. MSE ↓", 1, 3),
    ],
    "diabetes": [
        ("mse_progression", "progression MSE ↓", 1, 3),
        ("r2_progression", "progression R² ↑", 1, 3),
        ("mse_bmi", "bmi MSE", 1, 3),
        ("mse_s5", "s5 MSE", 1, 3),
    ],
}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value; NaN when empty)."""
    if not values:
        return float("nan"), float("nan")
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return m, s


def _fmt(m: float, s: float, scale: float = 1.0, dec: int = 3) -> str:
    if not math.isfinite(m):
        return "nan"
    return f"{m * scale:.{dec}f} ± {s * scale:.{dec}f}"


def _group(records: list[Record]) -> dict[str, dict[str, list[Record]]]:
    out: dict[str, dict[str, list[Record]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        out[r["problem"]][r["method"]].append(r)
    return out


def _paired_delta(runs: list[Record], base: list[Record], key: str) -> tuple[float, float, int]:
    """Mean and std of the per-seed difference ``method − uniform`` (same seed = same init and
    batches), and how many seeds the method is better on."""
    by_seed = {r["seed"]: r["metrics"][key] for r in base}
    diffs = [r["metrics"][key] - by_seed[r["seed"]] for r in runs if r["seed"] in by_seed]
    m, s = mean_std(diffs)
    return m, s, len(diffs)


def problem_tables(records: list[Record], methods: list[str]) -> dict[str, str]:
    """One markdown table per problem: metrics, paired Δ vs Uniform, time, SON-GOKU graph."""
    grouped = _group(records)
    tables: dict[str, str] = {}
    for problem, by_method in grouped.items():
        cols = COLUMNS.get(problem, [])
        first = next(iter(by_method.values()))[0]
        key, higher = first["headline"], first["higher_is_better"]
        scale = next((c[2] for c in cols if c[0] == key), 1.0)
        dec = next((c[3] for c in cols if c[0] == key), 3)
        planted = any("edge_f1" in r for rs in by_method.values() for r in rs)
        head = [
            "method",
            *[c[1] for c in cols],
            "Δ vs Uniform (paired)",
            "wins",
            "train time s",
            "ms/step",
        ]
        if planted:
            head += ["edge F1 (last refresh)", "groups (last)"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        base = by_method.get("uniform", [])
        for method in methods:
            runs = by_method.get(method)
            if not runs:
                continue
            row = [LABELS.get(method, method)]
            for mkey, _, sc, dc in cols:
                row.append(_fmt(*mean_std([r["metrics"][mkey] for r in runs]), sc, dc))
            if base and method != "uniform":
                dm, ds, n = _paired_delta(runs, base, key)
                by_seed = {r["seed"]: r["metrics"][key] for r in base}
                better = sum(
                    (r["metrics"][key] > by_seed[r["seed"]])
                    if higher
                    else (r["metrics"][key] < by_seed[r["seed"]])
                    for r in runs
                    if r["seed"] in by_seed
                )
                row += [f"{dm * scale:+.{dec}f} ± {ds * scale:.{dec}f}", f"{better}/{n}"]
            else:
                row += ["—", "—"]
            row.append(_fmt(*mean_std([r["time_s"] for r in runs]), 1, 2))
            row.append(f"{mean_std([r['ms_per_step'] for r in runs])[0]:.2f}")
            if planted:
                f1 = [r["edge_f1"][-1] for r in runs if r.get("edge_f1")]
                grp = [r["groups"][-1] for r in runs if r.get("groups")]
                row.append(_fmt(*mean_std(f1), 1, 2) if f1 else "—")
                row.append(_fmt(*mean_std([float(g) for g in grp]), 1, 1) if grp else "—")
            lines.append("| " + " | ".join(row) + " |")
        tables[problem] = "\n".join(lines)
    return tables


def per_task_table(records: list[Record], problem: str, methods: list[str]) -> str:
    """Mean test relative MSE per task (columns) and method (rows), for a planted problem."""
    runs = [r for r in records if r["problem"] == problem]
    if not runs:
        return ""
    names = runs[0]["task_names"]
    head = ["method", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        vals = [
            f"{mean_std([r['metrics'][f'rel_mse_{k}'] for r in rs])[0]:.3f}"
            for k in range(len(names))
        ]
        lines.append("| " + " | ".join([LABELS.get(method, method), *vals]) + " |")
    return "\n".join(lines)


def toy_table(toy: list[Record]) -> str:
    """Starts that end on the Pareto set, final loss-space distance, cost."""
    head = [
        "method",
        "starts ending on the Pareto set",
        "mean final distance (loss space)",
        "ms/step",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in toy:
        d = statistics.fmean(r["final_distance"] for r in t["runs"])
        lines.append(
            f"| {LABELS.get(t['method'], t['method'])} | {t['reached']}/{len(t['runs'])} | "
            f"{d:.4f} | {t['ms_per_step']:.2f} |"
        )
    return "\n".join(lines)


def headline_table(records: list[Record], toy: list[Record], methods: list[str]) -> str:
    """One row per method: the headline metric(s) of each problem, the toy, total training time.
    The best mean of each column is in bold."""
    grouped = _group(records)
    problems = [p for p in PROBLEM_TITLES if p in grouped] + [
        p for p in grouped if p not in PROBLEM_TITLES
    ]
    toy_by = {t["method"]: t for t in toy}
    columns = []  # (problem, key, higher_is_better, scale, decimals, best mean)
    for p in problems:
        r0 = next(iter(grouped[p].values()))[0]
        for key in [r0["headline"], *HEADLINE_EXTRA.get(p, [])]:
            higher = r0["higher_is_better"] if key == r0["headline"] else False
            cols = COLUMNS.get(p, [])
            sc = next((c[2] for c in cols if c[0] == key), 1.0)
            dc = next((c[3] for c in cols if c[0] == key), 3)
            means = [mean_std([r["metrics"][key] for r in rs])[0] for rs in grouped[p].values()]
            means = [m for m in means if math.isfinite(m)]
            best = (max(means) if higher else min(means)) if means else float("nan")
            columns.append((p, key, higher, sc, dc, best))
    head = ["method"] + [f"{p}: {key} {'↑' if hi else '↓'}" for p, key, hi, *_ in columns]
    if toy:
        head.append("toy: on front")
    head.append("total train time s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        row = [LABELS.get(method, method)]
        present = False
        for p, key, _, sc, dc, best in columns:
            rs = grouped[p].get(method, [])
            if not rs:
                row.append("—")
                continue
            present = True
            m, s = mean_std([r["metrics"][key] for r in rs])
            cell = _fmt(m, s, sc, dc)
            row.append(f"**{cell}**" if math.isclose(m, best, rel_tol=1e-6) else cell)
        total = sum(
            mean_std([r["time_s"] for r in grouped[p][method]])[0]
            for p in problems
            if grouped[p].get(method)
        )
        if toy:
            t = toy_by.get(method)
            row.append(f"{t['reached']}/{len(t['runs'])}" if t else "—")
            if t:
                present = True
                total += t["time_s"]
        if present:
            row.append(f"{total:.1f}")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown_report(
    records: list[Record],
    toy: list[Record],
    methods: list[str],
    settings: dict[str, Any],
    figures: list[str],
) -> str:
    """The full results page (tables; ``figures``: the figures' paths relative to the page)."""
    out = ["# Quality benchmark results", ""]
    out.append(
        "Mean ± sample std over seeds; every method trains the same model with the same optimizer "
        "(Adam, one learning rate per problem; rows marked *Adam β1 = 0* use betas (0.0, 0.999), "
        "see *optimizer* below) for the same number of optimizer steps on the same mini-batches "
        "(same seed = same initialisation and batch order). *Δ vs Uniform (paired)*: per-seed "
        "difference to "
        "Uniform, mean ± std; *wins*: seeds on which the method beats Uniform. Times: training "
        "only (gradient computation + optimizer step), single-threaded."
    )
    if any(m in ADAM_BETAS for m in methods):
        out += [
            "",
            "GCond rows: *Adam β1 = 0* keeps GCond's internal momentum (β = 0.85) and turns Adam's "
            "first moment off (betas (0.0, 0.999)), the usage GCond's reference recommends since "
            "the conductor owns the first moment. The other GCond rows use torch's default betas "
            "(0.9, 0.999): with GCond's momentum on, two first moments are stacked; *no internal "
            "momentum* leaves only Adam's.",
        ]
    if settings.get("merged runs"):
        out += [
            "",
            "Runs added later with `--merge` (*merged runs* below) were timed in their own sweep "
            "(its own worker count and machine load): compare their times with the others' with "
            "care. Their quality numbers are comparable (same seeds, budgets and mini-batches).",
        ]
    out += ["", "What these numbers show: `docs/results.md` (the documentation's results page)."]
    out += ["", "## Settings", "", "```"]
    out += [f"{k}: {v}" for k, v in settings.items()]
    out += ["```", "", "## Headline", "", headline_table(records, toy, methods), ""]
    tables = problem_tables(records, methods)
    for p, table in tables.items():
        out += [f"## {PROBLEM_TITLES.get(p, p)}", "", table, ""]
        if p.startswith("planted"):
            out += [f"Per-task test relative MSE ({p}, mean over seeds):", ""]
            out += [per_task_table(records, p, methods), ""]
    if toy:
        out += ["## 2-task toy (CAGrad / Nash-MTL)", "", toy_table(toy), ""]
    if figures:
        out += ["## Figures", ""]
        out += [f"![{f.rsplit('/', 1)[-1]}]({f})" for f in figures]
        out.append("")
    return "\n".join(out)
