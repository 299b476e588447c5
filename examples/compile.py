"""Compile the per-step paths of SON-GOKU and GradientConductor with ``torch.compile(fullgraph=True)``.

What compiles (the whole function traced into one graph, no graph break):

* SON-GOKU: ``tx.step(state, params, batch)`` — the per-step path (active group, per-task
  gradients, EMA, in-group transform, skip on non-finite). The recolouring ``tx.refresh`` runs
  eagerly every ``R`` steps: the loop below keeps its own Python counter ``t`` and calls it when
  ``t % R == 0`` (``tx.update`` is the eager driver that does the same).
* GradientConductor: ``conductor(..., compile=backend)`` compiles the resolve + momentum half of a
  cycle (``conductor(...).process``: Gramian, norm EMA, cap, conflict resolution,
  momentum). The accumulation over micro-batches stays eager.

Needs torch ≥ 2.10 and optree ≥ 0.13 (dynamo must trace optree's tree functions; see "Supported
versions" in the README).

Both are timed eagerly and compiled on the same inputs (median of repeated calls, after a
warm-up that includes the compilation), and the compiled results are checked against eager.
Run:

    python examples/compile.py                          # default backend (inductor)
    python examples/compile.py --backend aot_eager      # no code generation: checks tracing only
    python examples/compile.py --quick                  # smoke run (aot_eager, few repeats)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import optree
import torch

from gradfn import conductor, songoku

K, D, H = 4, 32, 128


def init_params(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "trunk.w1": torch.randn(H, D, generator=generator) * D**-0.5,
        "trunk.w2": torch.randn(H, H, generator=generator) * H**-0.5,
        "heads.w": torch.randn(K, H, generator=generator) * H**-0.5,
    }


def loss_fn(params: dict[str, torch.Tensor], batch: tuple) -> list[torch.Tensor]:
    x, y = batch
    h = torch.tanh(x @ params["trunk.w1"].T)
    h = torch.tanh(h @ params["trunk.w2"].T)
    out = h @ params["heads.w"].T
    return [((out[:, k] - y[:, k]) ** 2).mean() for k in range(K)]


def make_batch(generator: torch.Generator, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, D, generator=generator)
    w = torch.randn(D, K, generator=generator)
    w[:, 2] = -w[:, 0]  # task 2 opposes task 0
    return x, x @ w


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check_close(a: object, b: object, what: str) -> None:
    for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True):
        if x.is_floating_point():
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=f"{what}: compiled != eager")
        else:
            torch.testing.assert_close(x, y, msg=f"{what}: compiled != eager")


def report(name: str, eager: float, compiled: float, first: float) -> None:
    print(
        f"| {name} | {eager * 1e3:.2f} | {compiled * 1e3:.2f} | {eager / compiled:.2f}x "
        f"| {first:.1f} |"
    )


def songoku_demo(backend: str, repeats: int, gen: torch.Generator) -> None:
    params = init_params(gen)
    batches = [make_batch(gen) for _ in range(8)]
    tx = songoku(loss_fn, num_tasks=K, shared=lambda n: n.startswith("trunk."), refresh_period=4)
    state = tx.init(params)
    for t in range(1, 5):  # eager warm-up up to the first refresh: several colour groups
        state, _ = tx.update(state, params, batches[t % 8])

    step = torch.compile(tx.step, fullgraph=True, backend=backend)
    start = time.perf_counter()
    compiled_out = step(state, params, batches[0])
    first = time.perf_counter() - start
    check_close(compiled_out, tx.step(state, params, batches[0]), "songoku step")

    # a compiled loop: compiled step every call, eager refresh every R steps
    s, r = state, tx.config.refresh_period
    for t in range(int(s.step) + 1, int(s.step) + 1 + 2 * r):
        s, grads = step(s, params, batches[t % 8])
        params = {n: p - 0.01 * grads[n] for n, p in params.items()}
        if t % r == 0:
            s = tx.refresh(s, params)

    eager = timed(lambda: tx.step(state, params, batches[1]), repeats)
    compiled = timed(lambda: step(state, params, batches[1]), repeats)
    report("SON-GOKU `tx.step`", eager, compiled, first)


def conductor_demo(backend: str, repeats: int, gen: torch.Generator, quick: bool) -> None:
    params = init_params(gen)
    micro = [make_batch(gen, 16) for _ in range(4)]
    kwargs = dict(accumulation_steps=4, stochastic=False, norm_cap=5.0)
    if quick:  # fewer resolution iterations: the same traced program, unrolled less (faster)
        kwargs["max_iters"] = 2
    eager_tx = conductor(loss_fn, [1.0] * K, **kwargs)
    compiled_tx = conductor(loss_fn, [1.0] * K, compile=backend, **kwargs)
    state = eager_tx.init(params)

    start = time.perf_counter()
    compiled_out = compiled_tx.update(state, params, micro)
    first = time.perf_counter() - start
    check_close(compiled_out, eager_tx.update(state, params, micro), "conductor update")

    eager = timed(lambda: eager_tx.update(state, params, micro), repeats)
    compiled = timed(lambda: compiled_tx.update(state, params, micro), repeats)
    report("GCond `update` (process compiled)", eager, compiled, first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, help="inductor (default), aot_eager, eager")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="aot_eager, few repeats (smoke run)")
    args = parser.parse_args()
    backend = args.backend or ("aot_eager" if args.quick else "inductor")
    repeats = 3 if args.quick else args.repeats
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    print(f"backend={backend}, K={K}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| path | eager ms | compiled ms | speed-up | first call s (compile) |")
    print("|---|---|---|---|---|")
    songoku_demo(backend, repeats, gen)
    conductor_demo(backend, repeats, gen, args.quick)
    print("compiled results match eager")


if __name__ == "__main__":
    main()
