"""Aggregators: time per call of gradfn vs TorchJD on the same Jacobian, side by side in one run.

For every ``K`` (tasks) and ``n`` (parameters) a float32 Jacobian ``J`` (``K × n``, with planted
conflicts) is aggregated by both libraries, eagerly, on the same device; the calls of the two
libraries are interleaved in rounds and the median per call is reported, with the ratio
``TorchJD time / gradfn time`` (> 1: gradfn is faster). Stateful methods (GradVac, Nash-MTL) carry
their state across the timed calls in both libraries. TorchJD needs its optional solvers for
UPGrad/DualProj (quadprog), CAGrad (cvxpy) and Nash-MTL (cvxpy + ECOS), all installed by
``pip install -e ".[bench]"``; a TorchJD method that cannot be built is listed with the reason.
GCond and inverse-norm have no TorchJD counterpart (their time is listed without a ratio).

Each cell is timed over interleaved rounds (order rotated every round); the table gives the
median time per call of each library and the median ratio with its spread (min–max of the
per-round ratios).

Usage::

    python -m benchmarks.aggregators                 # K ∈ {2, 8, 32}, n ∈ {1e4, 1e5, 1e6}
    python -m benchmarks.aggregators --quick         # a smoke run
    python -m benchmarks.aggregators --methods upgrad,mgda --ks 2 --ns 10000
    python -m benchmarks.aggregators --out benchmarks/results/aggregators.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from collections.abc import Callable

import torch
import torchjd.aggregation as tjd

import gradfn.aggregators as A
from benchmarks._common import Timing, add_common_args, environment, interleave, progress, setup

NO_COUNTERPART = "no TorchJD counterpart"


def _jacobian(k: int, n: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(k * 1_000_003 + n)
    j = torch.randn(k, n, generator=g)
    for i in range(1, k, 2):  # every other task conflicts with its predecessor
        j[i] = -0.6 * j[i - 1] + 0.8 * j[i]
    return j.to(device)


def _gradfn_call(
    method: str, k: int, j: torch.Tensor, compiled: bool = False
) -> Callable[[], torch.Tensor]:
    agg = A.aggregator(method)
    grads = {"w": j}
    box = [agg.init(k, device=j.device)]
    update = torch.compile(agg.update, fullgraph=True, dynamic=False) if compiled else agg.update

    def call() -> torch.Tensor:
        box[0], out = update(box[0], grads)
        return out.grad["w"]

    return call


def _torchjd_call(method: str, k: int, j: torch.Tensor) -> Callable[[], torch.Tensor] | str:
    """TorchJD's aggregator on ``j``, or the reason there is none (shown in the table)."""
    make = {
        "mean": tjd.Mean,
        "sum": tjd.Sum,
        "pcgrad": tjd.PCGrad,
        "graddrop": tjd.GradDrop,
        "cagrad": lambda: tjd.CAGrad(c=0.5),
        "mgda": tjd.MGDA,
        "upgrad": tjd.UPGrad,
        "dualproj": tjd.DualProj,
        "imtl_g": tjd.IMTLG,
        "aligned_mtl": tjd.AlignedMTL,
        "gradvac": tjd.GradVac,
        "nash_mtl": lambda: tjd.NashMTL(n_tasks=k),
        "config": tjd.ConFIG,
    }.get(method)
    if make is None:
        return NO_COUNTERPART
    try:
        agg = make()
        agg(j)  # a missing solver may only show at the first call
    except ImportError as e:  # a missing optional solver: say which
        return f"TorchJD unavailable: {str(e).splitlines()[0]}"
    return lambda: agg(j)


def _fmt(t: float) -> str:
    return f"{t * 1e3:.2f} ms" if t >= 1e-4 else f"{t * 1e6:.0f} µs"


def _ratios(ref: Timing, ours: Timing) -> list[float]:
    return [a / b for a, b in zip(ref.samples, ours.samples, strict=False)]


def _cell(rs: list[float]) -> str:
    return f"{statistics.median(rs):.2f}× [{min(rs):.2f}–{max(rs):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--quick", action="store_true", help="K ∈ {2, 8}, n = 1e4, few rounds")
    parser.add_argument("--methods", default=",".join(A.METHODS))
    parser.add_argument("--ks", default=None, help="comma-separated K (default 2,8,32)")
    parser.add_argument("--ns", default=None, help="comma-separated n (default 1e4,1e5,1e6)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per cell")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="fail when a TorchJD method is unavailable (e.g. a missing solver)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="add a column with gradfn compiled (torch.compile, fullgraph, inductor)",
    )
    args = parser.parse_args()
    device = setup(args)
    warnings.filterwarnings("ignore")
    if args.compile:  # one compiled graph per (method, K, n)
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 1024)
    ks = [int(x) for x in args.ks.split(",")] if args.ks else [2, 8] if args.quick else [2, 8, 32]
    if args.ns:
        ns = [int(float(x)) for x in args.ns.split(",")]
    else:
        ns = [10_000] if args.quick else [10_000, 100_000, 1_000_000]
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(A.METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; expected some of {A.METHODS}")

    cmd = "python -m benchmarks.aggregators" + "".join(f" {a}" for a in sys.argv[1:])
    lines = [
        f"# Aggregators: gradfn vs TorchJD, time per call ({environment(device)})",
        "",
        f"`{cmd}`; float32 Jacobian K × n, eager, both libraries interleaved in rounds. "
        "Times: median per call. Ratio = TorchJD / gradfn (> 1: gradfn faster): median of the "
        "per-round ratios [min–max]"
        + (
            "; the compiled column is gradfn's `update` under `torch.compile(fullgraph=True)` "
            "(first-call compilation excluded)."
            if args.compile
            else "."
        ),
        "",
        "| method | K | n | gradfn | TorchJD | ratio [spread] |"
        + (" gradfn compiled | ratio (compiled) |" if args.compile else ""),
        "|---|---|---|---|---|---|" + ("---|---|" if args.compile else ""),
    ]
    print("\n".join(lines), flush=True)
    medians: dict[str, list[float]] = {}
    missing: list[str] = []
    for n, k in progress([(n, k) for n in ns for k in ks], "aggregators (n, K)"):
        j = _jacobian(k, n, device)
        for method in methods:
            ref = _torchjd_call(method, k, j)
            if isinstance(ref, str) and ref != NO_COUNTERPART:
                missing.append(f"{method}: {ref}")
                if args.strict:
                    raise SystemExit(f"{method}: {ref}")
            runners: dict[str, Callable[[], object]] = {"gradfn": _gradfn_call(method, k, j)}
            if not isinstance(ref, str):
                runners["torchjd"] = ref
            if args.compile:
                runners["compiled"] = _gradfn_call(method, k, j, compiled=True)
            cost = 1e-3 * k * n / 1e6  # rough seconds per call: fewer rounds for big cells
            rounds = args.rounds or (5 if args.quick else max(7, min(31, int(0.5 / cost))))
            calls = max(1, min(20, int(2e-4 / cost)))  # tiny cells: several calls a sample
            t = interleave(runners, device, rounds=rounds, calls=calls, warmup=2)
            ours = t["gradfn"]
            if "torchjd" in t:
                rs = _ratios(t["torchjd"], ours)
                medians.setdefault(method, []).append(statistics.median(rs))
                ref_s, ratio_s = _fmt(t["torchjd"].median), _cell(rs)
            else:
                ref_s, ratio_s = "—", str(ref)
            row = f"| {method} | {k} | {n:.0e} | {_fmt(ours.median)} | {ref_s} | {ratio_s} |"
            if args.compile:
                tc = t["compiled"]
                rc = _cell(_ratios(t["torchjd"], tc)) if "torchjd" in t else "—"
                row += f" {_fmt(tc.median)} | {rc} |"
            lines.append(row)
            print(row, flush=True)
    lines += ["", "| method | min median ratio | max median ratio |", "|---|---|---|"]
    for method, rs in medians.items():
        lines.append(f"| {method} | {min(rs):.2f}× | {max(rs):.2f}× |")
    if missing:
        lines += ["", "TorchJD methods not measured:", *sorted({f"- {m}" for m in missing})]
    print("\n".join(lines[-len(medians) - 3 :]))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
