"""The tuned protocol's equal-wall-clock view and its validation-curve figures.

Equal wall-clock: for each seed, the time budget is Uniform's training time at its selected
learning rate (``time_s``: gradient computation and optimizer steps only); every method's score
is the best validation metric its curve reached within that budget (a curve point counts when its
cumulative training time is ≤ the budget; none: NaN). Validation, not test: the test split is
read once per run, at the best-validation checkpoint of the full budget.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from benchmarks.quality.methods import LABELS

__all__ = ["equal_time_rows", "equal_time_table", "validation_curves"]

Record = dict[str, Any]


def _best_within(run: Record, budget: float) -> float:
    key, higher = f"val_{run['select_metric']}", run["select_higher"]
    vals = [c[key] for c in run["curve"] if c["time"] <= budget and not math.isnan(c[key])]
    if not vals:
        return float("nan")
    return max(vals) if higher else min(vals)


def equal_time_rows(chosen: dict[tuple[str, str], list[Record]]) -> dict[str, list[Record]]:
    """Per problem, one row per method (not the single-task baselines): Uniform's mean budget,
    the mean best validation metric within it, the paired difference to Uniform (mean, 95 % t
    interval) and the share of seeds whose curve reached the budget's first point."""
    from benchmarks.quality.protocol import paired_interval

    rows: dict[str, list[Record]] = {}
    for (problem, method), runs in sorted(chosen.items()):
        uni = {r["seed"]: r for r in chosen.get((problem, "uniform"), [])}
        if method.startswith("stl_") or not uni:
            continue
        pairs = [(r, uni[r["seed"]]) for r in runs if r["seed"] in uni]
        scores = [_best_within(r, u["time_s"]) for r, u in pairs]
        base = [_best_within(u, u["time_s"]) for _, u in pairs]
        ok = [(s, b) for s, b in zip(scores, base, strict=True) if not math.isnan(s)]
        row: Record = {
            "method": method,
            "budget_s": sum(u["time_s"] for _, u in pairs) / len(pairs),
            "reached": len(ok) / len(pairs),
            "val": sum(s for s, _ in ok) / len(ok) if ok else float("nan"),
        }
        if method != "uniform" and ok:
            row["vs_uniform"] = paired_interval([s - b for s, b in ok])
        rows.setdefault(problem, []).append(row)
    order = list(LABELS)
    for table in rows.values():
        table.sort(key=lambda x: order.index(x["method"]) if x["method"] in order else 99)
    return rows


def equal_time_table(rows: list[Record], metric: str) -> list[str]:
    """Markdown lines of one problem's equal-wall-clock table."""
    from benchmarks.quality.protocol import _ci

    lines = [
        "",
        "Equal wall-clock: the best validation metric each method reached within Uniform's "
        "training time (same seed, selected learning rates); paired Student-t 95 % intervals.",
        "",
        f"| Method | budget s | val {metric} at budget | Δ vs Uniform [95 % CI] | seeds reached |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {LABELS.get(r['method'], r['method'])} | {r['budget_s']:.1f} "
            f"| {'–' if math.isnan(r['val']) else format(r['val'], '.4f')} "
            f"| {_ci(r.get('vs_uniform'))} | {r['reached']:.0%} |"
        )
    return lines


def validation_curves(chosen: dict[tuple[str, str], list[Record]], out: Path) -> list[str]:
    """One PNG per problem: each method's validation curve at its selected learning rate (mean
    over seeds; single-task baselines left out); returns the file names."""
    from benchmarks.quality.figures import _colour, _plt

    plt = _plt()
    files = []
    for problem in sorted({p for p, _ in chosen}):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        methods = [m for p, m in chosen if p == problem and not m.startswith("stl_")]
        order = list(LABELS)
        methods.sort(key=lambda m: order.index(m) if m in order else 99)
        key = ""
        for i, method in enumerate(methods):
            runs = chosen[(problem, method)]
            key = f"val_{runs[0]['select_metric']}"
            n = min(len(r["curve"]) for r in runs)
            steps = [runs[0]["curve"][j]["step"] for j in range(n)]
            y = [sum(r["curve"][j][key] for r in runs) / len(runs) for j in range(n)]
            label = f"{LABELS.get(method, method)} (lr {runs[0]['lr']:g})"
            if method == "uniform":  # the reference every other curve is read against
                ax.plot(steps, y, "-", lw=2.4, color="black", label=label, zorder=5)
            else:
                style = ("--", ":", "-.")[(i // 10) % 3]
                ax.plot(steps, y, style, lw=1.2, color=_colour(i), label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key.replace("_", " "))
        ax.set_title(f"{problem}: validation curves at the selected lr (mean over seeds)")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.grid(alpha=0.3)
        name = f"validation_curves_{problem}.png"
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append(name)
    return files


def verdict(row: dict[str, Any]) -> str:
    """``better`` / ``worse`` than Uniform when the paired 95 % interval excludes 0 in that
    direction, ``tie`` when every seed tied, else ``≈`` (no difference shown)."""
    ci = row.get("vs_uniform")
    if ci is None:
        return "–"
    if "wtl" in row and row["wtl"][1] == sum(row["wtl"]):
        return "tie"
    _, lo, hi = ci
    if math.isnan(lo):
        return "≈"
    sign = 1.0 if row.get("higher", True) else -1.0
    if min(sign * lo, sign * hi) > 0:
        return "better"
    if max(sign * lo, sign * hi) < 0:
        return "worse"
    return "≈"


def overview_table(rows: dict[str, list[dict[str, Any]]], conflict: dict[str, Any]) -> list[str]:
    """One line per method, one column per problem: the verdict against Uniform on the problem's
    headline (paired 95 % interval over seeds) and the method's Δm % (lower is better)."""
    problems = list(rows)
    if not problems:
        return []
    role = {p: " (control)" if conflict.get(p, {}).get("control") else "" for p in problems}
    lines = [
        "",
        "## Overview",
        "",
        "Each cell: the verdict against Uniform on the problem's headline metric (*better* / "
        "*worse*: the paired 95 % interval over seeds excludes 0; *≈*: it does not; *tie*: every "
        "seed tied) and Δm % against the single-task baselines (lower is better). Selection: "
        "each method at its own learning rate, chosen on validation.",
        "",
        "| Method | " + " | ".join(f"{p}{role[p]}" for p in problems) + " |",
        "|---|" + "---|" * len(problems),
    ]
    methods: list[str] = []
    for table in rows.values():
        methods += [r["method"] for r in table if r["method"] not in methods]
    for m in methods:
        cells = []
        for p in problems:
            row = next((r for r in rows[p] if r["method"] == m), None)
            if row is None:
                cells.append("–")
                continue
            dm = row.get("delta_m")
            dm_text = "" if dm is None else f", Δm {dm[0]:+.1f} %"
            cells.append(f"{verdict(row)}{dm_text}")
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return lines
