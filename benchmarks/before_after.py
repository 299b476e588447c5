"""Two versions of gradfn side by side: every speed benchmark, alternating old and new.

``--old`` is a checkout of the older version (for 0.1.0: ``git worktree add ../gradfn-0.1
406b9f1``).
For each benchmark and each round, the old checkout's script runs, then this checkout's, each in
its own process with ``--threads 1``; the tables compare the benchmarks' own ratios (each measured
side by side within its run), the old as the median over rounds. Old versions run their scripts
by path (``python benchmarks/X.py``) with ``PYTHONPATH`` pointing at the old checkout.

Run from the repository root::

    python -m benchmarks.before_after --old ../gradfn-0.1 --rounds 2

(about 12 minutes a round on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# benchmark -> [(title, key columns, value column, suffix after the value)]
TABLES: dict[str, list[tuple[str, tuple[int, ...], str, str]]] = {
    "songoku": [
        ("SON-GOKU, adapter step / plain step (lower is better)", (0, 1), "ratio", "×"),
        ("SON-GOKU, speed-up vs the reference's way (higher is better)", (0,), "speed-up", "×"),
        ("SON-GOKU, dense refresh (lower is better)", (0,), "dense refresh (ms)", " ms"),
        ("SON-GOKU, sketched refresh (lower is better)", (0,), "sketch refresh (ms)", " ms"),
    ],
    "conductor": [
        ("GradientConductor (see its table for the sense of each ratio)", (0, 1), "ratio", "×")
    ],
    "per_task_grads": [
        ("per-task gradients, naive / auto (higher is better)", (0, 1), "naive / auto", "×")
    ],
    "aggregators": [("aggregators, TorchJD / gradfn (higher is better)", (0, 1, 2), "ratio", "×")],
    "compile": [("compile, eager / compiled (higher is better)", (0, 1), "speed-up", "×")],
}


def _rows(text: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|") and not line.startswith("|---")
    ]


def _number(cell: str) -> float | None:
    match = re.search(r"[-+]?\d+(\.\d+)?", cell.replace(",", ""))
    return float(match.group()) if match else None


def _values(text: str, keys: tuple[int, ...], column: str) -> dict[str, float]:
    out: dict[str, float] = {}
    header: list[str] | None = None
    for row in _rows(text):
        if column in row:
            header = row
            continue
        if header is None or len(row) != len(header):
            continue
        value = _number(row[header.index(column)])
        if value is not None:
            out[" | ".join(row[i] for i in keys)] = value
    return out


def _run(name: str, checkout: Path, new: bool, table_file: Path, quick: bool) -> str:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    if new:
        cmd = [sys.executable, "-m", f"benchmarks.{name}", "--threads", "1"]
    else:
        cmd = [sys.executable, f"benchmarks/{name}.py"]
        if name != "aggregators":  # 0.1's aggregator script has no --threads
            cmd += ["--threads", "1"]
    if name == "compile":
        cmd += ["--out", str(table_file)]
    if quick:
        cmd.append("--quick")
    done = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, check=True)
    return table_file.read_text() if name == "compile" else done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="checkout of the older version")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--benchmarks", default=",".join(TABLES))
    parser.add_argument("--quick", action="store_true", help="the benchmarks' smoke runs")
    args = parser.parse_args()
    names = [n for n in args.benchmarks.split(",") if n]
    runs: dict[tuple[str, str], list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in names:
                for side, checkout in (("old", args.old.resolve()), ("new", ROOT)):
                    print(f"round {r + 1}: {name} ({side})", file=sys.stderr, flush=True)
                    table = Path(tmp) / f"{name}-{side}-{r}.md"
                    runs.setdefault((name, side), []).append(
                        _run(name, checkout, side == "new", table, args.quick)
                    )
    print(f"# Before / after: `{args.old}` vs this checkout ({args.rounds} rounds, --threads 1)")
    for name in names:
        for title, keys, column, unit in TABLES[name]:
            old = [_values(t, keys, column) for t in runs[(name, "old")]]
            new = [_values(t, keys, column) for t in runs[(name, "new")]]
            print(
                f"\n## {title}\n\n| row | old (median) | new (median) | new / old |\n|---|---|---|---|"
            )
            for key in old[0]:
                a = [v[key] for v in old if key in v]
                b = [v[key] for v in new if key in v]
                if a and b:
                    ma, mb = statistics.median(a), statistics.median(b)
                    print(f"| {key} | {ma:.2f}{unit} | {mb:.2f}{unit} | {mb / ma:.2f} |")


if __name__ == "__main__":
    main()
