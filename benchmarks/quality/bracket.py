"""The tuned protocol's learning-rate grids must bracket the optimum.

After a sweep, a method whose selected learning rate (the protocol's rule,
:func:`benchmarks.quality.protocol.select`) is the smallest or the largest of its grid gets one
more point beyond that edge, one log-step further (the ratio of the two outermost points on that
side), for every seed; the sweep then continues until every selection is inside its grid or the
grid has ``max_extra`` extra points. A selection still at an edge is flagged in the tables
("at grid edge").
"""

from __future__ import annotations

import dataclasses
from typing import Any

from benchmarks.quality.runner import RunSpec

__all__ = ["extension_specs", "grid_edges"]

Record = dict[str, Any]


def _grids(records: list[Record]) -> dict[tuple[str, str], list[float]]:
    grids: dict[tuple[str, str], set[float]] = {}
    for r in records:
        grids.setdefault((r["problem"], r["method"]), set()).add(r["lr"])
    return {k: sorted(v) for k, v in grids.items()}


def grid_edges(records: list[Record]) -> dict[tuple[str, str], str | None]:
    """``(problem, method) -> "low" | "high" | None``: where the selected learning rate sits in
    the grid that was run (None: strictly inside, or a one-point grid)."""
    from benchmarks.quality.protocol import select

    grids = _grids(records)
    out: dict[tuple[str, str], str | None] = {}
    for key, runs in select(records).items():
        lrs, lr = grids[key], runs[0]["lr"]
        out[key] = (
            None if len(lrs) < 2 else "low" if lr == lrs[0] else "high" if lr == lrs[-1] else None
        )
    return out


def extension_specs(
    specs: list[RunSpec], records: list[Record], base_points: dict[str, int], max_extra: int
) -> list[RunSpec]:
    """The next runs: for every ``(problem, method)`` selected at an edge of its grid and with
    fewer than ``base_points[problem] + max_extra`` points, one more learning rate beyond that
    edge, for every seed of its runs (a copy of the run's spec with the new ``lr``)."""
    if max_extra < 0:
        raise ValueError(f"extension_specs: max_extra must be ≥ 0 (got {max_extra})")
    grids = _grids(records)
    template: dict[tuple[str, str], dict[int, RunSpec]] = {}
    for s in specs:
        template.setdefault((s.problem, s.method), {})[s.seed] = s
    new: list[RunSpec] = []
    for key, edge in grid_edges(records).items():
        lrs = grids[key]
        if edge is None or len(lrs) >= base_points[key[0]] + max_extra:
            continue
        lr = lrs[0] ** 2 / lrs[1] if edge == "low" else lrs[-1] ** 2 / lrs[-2]
        lr = float(f"{lr:.3g}")
        new += [dataclasses.replace(s, lr=lr) for _, s in sorted(template[key].items())]
    return new
