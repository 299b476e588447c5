"""Aggregators: time per call of gradfn vs TorchJD on the same Jacobian, side by side in one run.

For every ``K`` (tasks) and ``n`` (parameters) a float32 Jacobian ``J`` (``K × n``, with planted
conflicts) is aggregated by both libraries, eagerly, on the same device; the calls of the two
libraries are interleaved in rounds and the median per call is reported, with the ratio
``TorchJD time / gradfn time`` (> 1: gradfn is faster). Stateful methods (GradVac, Nash-MTL) carry
their state across the timed calls in both libraries. TorchJD needs its optional solvers for
UPGrad/DualProj (quadprog), CAGrad (cvxpy + Clarabel) and Nash-MTL (cvxpy + ECOS):
``pip install "torchjd[quadprog_projector,cagrad,nash_mtl]"``. GCond has no TorchJD counterpart
(its time is listed without a ratio).

Usage::

    python -m benchmarks.aggregators                 # K ∈ {2, 8, 32}, n ∈ {1e4, 1e6}
    python -m benchmarks.aggregators --quick         # a smoke run
    python -m benchmarks.aggregators --out benchmarks/results/aggregators.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torchjd.aggregation as tjd

import gradfn.aggregators as A


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


def _torchjd_call(method: str, k: int, j: torch.Tensor) -> Callable[[], torch.Tensor] | None:
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
        return None
    try:
        agg = make()
    except ImportError as e:  # a missing optional solver
        print(f"  TorchJD {method}: {e}")
        return None
    return lambda: agg(j)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(
    fns: list[Callable[[], torch.Tensor] | None], device: torch.device, rounds: int, budget_s: float
) -> list[float | None]:
    """Median seconds per call of each fn, interleaved over rounds."""
    samples: list[list[float]] = [[] for _ in fns]
    for fn in fns:  # warm-up
        if fn is not None:
            fn()
    _sync(device)
    start = time.perf_counter()
    for r in range(rounds):
        for i, fn in enumerate(fns):
            if fn is None:
                continue
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples[i].append(time.perf_counter() - t0)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return [statistics.median(s) if s else None for s in samples]


def _fmt(t: float | None) -> str:
    if t is None:
        return "—"
    return f"{t * 1e3:.2f} ms" if t >= 1e-4 else f"{t * 1e6:.0f} µs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="K ∈ {2, 8}, n = 1e4, few rounds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", default=",".join(A.METHODS))
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="add a column with gradfn compiled (torch.compile, fullgraph, inductor)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    ks = (2, 8) if args.quick else (2, 8, 32)
    if args.compile:  # one compiled graph per (method, K, n)
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 1024)
    ns = (10_000,) if args.quick else (10_000, 1_000_000)
    rounds, budget = (3, 0.5) if args.quick else (15, 4.0)
    methods = [m for m in args.methods.split(",") if m]

    lines = [
        f"# Aggregators: gradfn vs TorchJD, time per call ({device.type}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()})",
        "",
        "`python -m benchmarks.aggregators"
        + (" --quick" if args.quick else "")
        + (" --compile" if args.compile else "")
        + "`; float32 Jacobian K × n, median of interleaved rounds; TorchJD runs eagerly. Ratio = "
        "TorchJD / gradfn (> 1: gradfn faster)"
        + (
            "; the compiled column is gradfn's `update` under `torch.compile(fullgraph=True)` "
            "(first-call compilation excluded)."
            if args.compile
            else "."
        ),
        "",
        "| method | K | n | gradfn | TorchJD | ratio |"
        + (" gradfn compiled | ratio (compiled) |" if args.compile else ""),
        "|---|---|---|---|---|---|" + ("---|---|" if args.compile else ""),
    ]
    print("\n".join(lines), flush=True)
    ratios: dict[str, list[float]] = {}
    c_ratios: dict[str, list[float]] = {}
    for n in ns:
        for k in ks:
            j = _jacobian(k, n, device)
            for method in methods:
                fns = [_gradfn_call(method, k, j), _torchjd_call(method, k, j)]
                if args.compile:
                    fns.append(_gradfn_call(method, k, j, compiled=True))
                times = _time(fns, device, rounds, budget)
                t_ours, t_ref = times[0], times[1]
                ratio = None if t_ref is None or t_ours is None else t_ref / t_ours
                if ratio is not None:
                    ratios.setdefault(method, []).append(ratio)
                row = (
                    f"| {method} | {k} | {n:.0e} | {_fmt(t_ours)} | {_fmt(t_ref)} | "
                    f"{'—' if ratio is None else f'{ratio:.2f}×'} |"
                )
                if args.compile:
                    t_c = times[2]
                    r_c = None if t_ref is None or t_c is None else t_ref / t_c
                    if r_c is not None:
                        c_ratios.setdefault(method, []).append(r_c)
                    row += f" {_fmt(t_c)} | {'—' if r_c is None else f'{r_c:.2f}×'} |"
                lines.append(row)
                print(row, flush=True)
    lines += [
        "",
        "| method | min ratio | max ratio |"
        + (" min (compiled) | max (compiled) |" if c_ratios else ""),
        "|---|---|---|" + ("---|---|" if c_ratios else ""),
    ]
    for method, rs in ratios.items():
        row = f"| {method} | {min(rs):.2f}× | {max(rs):.2f}× |"
        if c_ratios:
            cr = c_ratios.get(method, [])
            row += f" {min(cr):.2f}× | {max(cr):.2f}× |" if cr else " — | — |"
        lines.append(row)
    print("\n".join(lines[-len(ratios) - 3 :]))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
