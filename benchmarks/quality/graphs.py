"""SON-GOKU's graph and group recovery in the tuned protocol.

At each refresh the runner records (for the SON-GOKU family, :mod:`benchmarks.quality.runner`):

* ``edge_f1_exact``: F1 of SON-GOKU's conflict edges against the *exact* graph of that refresh,
  ``{(i, j): −cos(∇L_i, ∇L_j) > τ}`` from the full-batch trunk gradients at the same parameters
  and the same ``τ`` (what an ideal estimator of the graph would return);
* ``edge_f1``: the same against the planted graph (planted problems);
* ``ari``: the adjusted Rand index (Hubert & Arabie 1985) of the groups (each task's first group)
  against the planted partition (planted problems): 1 for the partition, ≈ 0 for chance.
"""

from __future__ import annotations

import math
from typing import Any

from benchmarks.quality.methods import LABELS, SONGOKU_FAMILY

__all__ = ["SCORES", "graph_rows", "graph_table"]

Record = dict[str, Any]
SCORES = ("edge_f1_exact", "edge_f1", "ari")


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def graph_rows(chosen: dict[tuple[str, str], list[Record]]) -> dict[str, list[Record]]:
    """Per problem, one row per SON-GOKU-family method (its selected runs): each score's mean
    over refreshes, then over seeds, and its value at the last refresh (mean over seeds)."""
    rows: dict[str, list[Record]] = {}
    for (problem, method), runs in sorted(chosen.items()):
        if method not in SONGOKU_FAMILY:
            continue
        row: Record = {
            "method": method,
            "refreshes": _mean([len(r.get("groups", [])) for r in runs]),
        }
        for score in SCORES:
            seqs = [r[score] for r in runs if r.get(score)]
            if seqs:
                row[score] = (_mean([_mean(s) for s in seqs]), _mean([s[-1] for s in seqs]))
        rows.setdefault(problem, []).append(row)
    for table in rows.values():
        table.sort(key=lambda x: SONGOKU_FAMILY.index(x["method"]))
    return rows


def _cell(x: tuple[float, float] | None) -> str:
    if x is None or math.isnan(x[0]):
        return "–"
    return f"{x[0]:.2f} ({x[1]:.2f})"


def graph_table(rows: list[Record]) -> list[str]:
    """Markdown lines of one problem's graph-recovery table."""
    lines = [
        "",
        "SON-GOKU's graph at each refresh: edge F1 against the exact full-batch gradient graph "
        "(same τ) and against the planted graph, and the ARI of its groups against the planted "
        "partition; mean over refreshes and seeds (last refresh in brackets).",
        "",
        "| Method | refreshes | F1 vs exact graph | F1 vs planted graph | ARI vs planted |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {LABELS[row['method']]} | {row['refreshes']:.0f} | {_cell(row.get('edge_f1_exact'))} "
            f"| {_cell(row.get('edge_f1'))} | {_cell(row.get('ari'))} |"
        )
    return lines
