"""Reliability audit: many seeded bad-day cases against gradfn's public entry points, each
classified as ok, clear error, unclear crash, silent wrong result or hang (``benchmarks/_audit.py``
defines the rules); writes ``benchmarks/results/reliability_audit.md`` and ``.json``.

    python -m benchmarks.reliability_audit            # the full audit (~1,000+ cases)
    python -m benchmarks.reliability_audit --quick    # a few dozen cases
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections import Counter
from collections.abc import Iterator

import torch

from benchmarks._audit import CATEGORIES, Case, Result, run_case, write_report
from benchmarks._audit_aggregators import aggregator_cases
from benchmarks._audit_autodiff import autodiff_cases, weighting_cases
from benchmarks._audit_configs import config_cases
from benchmarks._audit_training import training_cases

__all__ = ["all_cases", "main"]


def all_cases() -> Iterator[Case]:
    """Every case, in a fixed order (the quick run takes an evenly spaced subset)."""
    yield from aggregator_cases()
    yield from weighting_cases()
    yield from autodiff_cases()
    yield from config_cases()
    yield from training_cases()


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="an evenly spaced ~40-case subset")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per case (hang)")
    parser.add_argument("--out", default="benchmarks/results/reliability_audit", help="path stem")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = list(all_cases())
    if args.quick:
        cases = cases[:: max(1, len(cases) // 40)]
    results: list[Result] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, case in enumerate(cases):
            results.append(run_case(case, args.timeout))
            if sys.stderr.isatty():
                print(f"\r{i + 1}/{len(cases)}", end="", file=sys.stderr)
    command = "python -m benchmarks.reliability_audit" + (" --quick" if args.quick else "")
    write_report(results, command, f"{args.out}.md", f"{args.out}.json")
    counts = Counter(r.category for r in results)
    print(" ".join(f"{k}={counts[k]}" for k in CATEGORIES), f"total={len(results)}")
    return {k: counts[k] for k in CATEGORIES}


if __name__ == "__main__":
    main()
