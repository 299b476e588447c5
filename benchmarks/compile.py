"""Eager vs ``torch.compile`` per-step time of SON-GOKU and GradientConductor, side by side.

For each configuration the same inputs go through the eager function and its compiled version
(``fullgraph=True``); the table gives the median step time of each, their ratio (speed-up) and the
first compiled call (tracing + code generation). What is compiled:

* SON-GOKU ``tx.step`` (the whole per-step path: per-task gradients or one backward, EMA, in-group
  transform, skip test); the recolouring ``tx.refresh`` every ``R`` steps stays eager and is not
  timed here.
* GCond ``update`` with ``conductor(..., compile=backend)``: the resolve + momentum half
  (``conductor(...).process``) compiled, the accumulation over micro-batches eager.

Run: ``python -m benchmarks.compile`` (``--quick``: fewer configurations and repeats); writes the
markdown table to ``benchmarks/results/compile.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

# compile in this process: inductor's background compile workers would otherwise compete with
# the timed calls for the CPU
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import optree
import torch

from benchmarks._common import add_common_args, environment, progress, setup, sync
from gradfn import conductor, songoku

D = 32
DEVICE = torch.device("cpu")  # set by --device


def init_params(k: int, h: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "trunk.w1": torch.randn(h, D, generator=gen) * D**-0.5,
        "trunk.w2": torch.randn(h, h, generator=gen) * h**-0.5,
        "heads.w": torch.randn(k, h, generator=gen) * h**-0.5,
    }


def make_loss(k: int):
    def loss_fn(params: dict[str, torch.Tensor], batch: tuple) -> list[torch.Tensor]:
        x, y = batch
        z = torch.tanh(x @ params["trunk.w1"].T)
        z = torch.tanh(z @ params["trunk.w2"].T)
        out = z @ params["heads.w"].T
        return [((out[:, i] - y[:, i]) ** 2).mean() for i in range(k)]

    return loss_fn


def make_batch(k: int, gen: torch.Generator, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, D, generator=gen)
    w = torch.randn(D, k, generator=gen)
    w[:, 1] = -w[:, 0]  # a conflicting pair
    return x, x @ w


def to_device(tree):
    return optree.tree_map(lambda x: x.to(DEVICE), tree)


def median_times(
    eager: Callable[[], object], compiled: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Median seconds of each, calls interleaved (eager, compiled, eager, ...) so that a change
    of machine load hits both alike."""
    eager(), compiled()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((eager, times[0]), (compiled, times[1])):
            sync(DEVICE)
            start = time.perf_counter()
            fn()
            sync(DEVICE)
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def check_close(a: object, b: object, what: str) -> None:
    for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True):
        if x.is_floating_point():
            torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4, msg=f"{what}: compiled != eager")
        else:
            torch.testing.assert_close(x, y, msg=f"{what}: compiled != eager")


def bench_songoku(k: int, h: int, mode: str, backend: str, repeats: int) -> tuple:
    gen = torch.Generator().manual_seed(0)
    params = to_device(init_params(k, h, gen))
    batches = [to_device(make_batch(k, gen)) for _ in range(4)]
    tx = songoku(
        make_loss(k),
        num_tasks=k,
        shared=lambda n: n.startswith("trunk."),
        refresh_period=4,
        ema_mode=mode,
        per_task_rows="all",
    )
    state = tx.init(params)
    for t in range(4):  # up to the first refresh: several colour groups
        state, _ = tx.update(state, params, batches[t])
    step = torch.compile(tx.step, fullgraph=True, backend=backend)
    start = time.perf_counter()
    out = step(state, params, batches[0])
    sync(DEVICE)
    first = time.perf_counter() - start
    check_close(out, tx.step(state, params, batches[0]), "songoku")
    eager, compiled = median_times(
        lambda: tx.step(state, params, batches[1]), lambda: step(state, params, batches[1]), repeats
    )
    return f"SON-GOKU step, ema_mode={mode}", eager, compiled, first


def bench_conductor(k: int, h: int, stochastic: bool, backend: str, repeats: int) -> tuple:
    gen = torch.Generator().manual_seed(0)
    params = to_device(init_params(k, h, gen))
    micro = [to_device(make_batch(k, gen, 16)) for _ in range(k)]
    kw = dict(accumulation_steps=k, stochastic=stochastic, norm_cap=5.0)
    eager_tx = conductor(make_loss(k), [1.0] * k, **kw)
    compiled_tx = conductor(make_loss(k), [1.0] * k, compile=backend, **kw)
    state = eager_tx.init(params)
    start = time.perf_counter()
    out = compiled_tx.update(state, params, micro)
    sync(DEVICE)
    first = time.perf_counter() - start
    check_close(out, eager_tx.update(state, params, micro), "conductor")
    eager, compiled = median_times(
        lambda: eager_tx.update(state, params, micro),
        lambda: compiled_tx.update(state, params, micro),
        repeats,
    )
    mode = "stochastic" if stochastic else "classic"
    return f"GCond update ({mode}, process compiled)", eager, compiled, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="K=4 only, few repeats")
    add_common_args(parser)
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parent / "results" / "compile.md")
    )
    args = parser.parse_args()
    global DEVICE
    DEVICE = setup(args)
    repeats = 5 if args.quick else args.repeats
    sizes = [(4, 128)] if args.quick else [(4, 128), (8, 256)]
    rows = []
    for k, h in progress(sizes, "compile"):
        n = h * D + h * h
        for mode in ("active", "refresh"):
            rows.append((k, h, n, *bench_songoku(k, h, mode, args.backend, repeats)))
            print(rows[-1], flush=True)
        for stochastic in (False, True):
            rows.append((k, h, n, *bench_conductor(k, h, stochastic, args.backend, repeats)))
            print(rows[-1], flush=True)
    lines = [
        "# Eager vs torch.compile step time",
        "",
        f"`python -m benchmarks.compile{' --quick' if args.quick else ''}"
        f"{'' if DEVICE.type == 'cpu' else ' --device ' + str(DEVICE)}` — backend "
        f"`{args.backend}`, {environment(DEVICE)}; median of {repeats} interleaved calls after a warm-up; "
        "`fullgraph=True`; compiled results checked against eager. Speed-up = eager / compiled "
        "(> 1: compiled is faster). MLP trunk `D=32 → H → H`, `K` linear heads, batch 64 "
        "(GCond: `N=K` micro-batches of 16).",
        "",
        "| path | K | H | shared params n | eager ms | compiled ms | speed-up | first call s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, h, n, name, eager, compiled, first in rows:
        lines.append(
            f"| {name} | {k} | {h} | {n} | {eager * 1e3:.2f} | {compiled * 1e3:.2f} "
            f"| {eager / compiled:.2f}x | {first:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
