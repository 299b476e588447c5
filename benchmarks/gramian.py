"""Gramian-first without the rows: ``backward(gramian="streaming")`` vs the row path vs TorchJD.

A step is ``zero_grad`` + forward + per-task differentiation + UPGrad, written into ``p.grad``,
with the Jacobian w.r.t. every parameter (trunk and heads) aggregated:

* ``rows``: ``aggregators.backward(losses, model, "upgrad", gramian="rows")`` (the default
  ``strategy="auto"``: one backward per task on the CPU, one batched backward on accelerators);
* ``rows-vmap``: the same with ``strategy="vmap"`` (the batched backward the streaming path uses);
* ``streaming``: ``gramian="streaming"``: ``G`` folded leaf by leaf in one batched backward,
  then one backward of ``Σ_k w_k L_k``;
* ``autogram``: TorchJD 0.18 ``autogram.Engine(model, batch_dim=None)``:
  ``compute_gramian(stack(losses))``, ``UPGradWeighting``, ``stack(losses).backward(w)`` (the
  losses are means over the batch, so there is no batch dimension to exploit).

Timing: all runners of a cell side by side in interleaved rounds
(:func:`benchmarks._common.interleave`), per-round ratios with [min–max]. Peak memory: one step,
measured as in ``benchmarks/backward.py`` (CPU: the profiler's allocation events summed in time
order from the step's start, parameters excluded, ``.grad`` set to None before the step; CUDA:
``max_memory_allocated`` minus the memory allocated before the step). The target bound is one
parameter copy + ``K`` × the largest parameter + the forward's own peak (the activations).

``--songoku``: SON-GOKU with a sketched EMA (``sketch_dim=256``) on the 1.8M-parameter MLP,
``SonGokuScheduler(rows="rows")`` vs ``rows="streaming"`` (the sketches from one batched backward,
the update from one backward of the group's loss), K ∈ {8, 32}, every task active at every step
(τ = 1: one group, the first refresh window's case), SGD. Time per step in interleaved rounds;
peak memory over a fresh scheduler's first three steps (its setup and the row path's kept row
buffers included, parameters excluded).

Usage::

    python -m benchmarks.gramian            # K in {2, 8, 32}, and the 1.8 M-parameter MLP at K = 8
    python -m benchmarks.gramian --quick    # a smoke run
    python -m benchmarks.gramian --songoku  # the SON-GOKU table only
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchjd.aggregation import UPGradWeighting
from torchjd.autogram import Engine

import gradfn.aggregators as A
from benchmarks._common import add_common_args, environment, interleave, ratio_spread, setup
from benchmarks.backward import peak_mib
from benchmarks.per_task_grads import CNNHeads, LargeMLPHeads, MLPHeads
from gradfn import SonGokuScheduler, TaskSpec, TauSchedule


def losses_of(model: nn.Module, batch: tuple[Tensor, Tensor]) -> list[Tensor]:
    x, y = batch
    h = model.trunk(x)
    return [nn.functional.cross_entropy(head(h), y[:, i]) for i, head in enumerate(model.heads)]


def runners(model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Callable[[], None]]:
    agg = A.aggregator("upgrad")
    twin = copy.deepcopy(model)  # the engine's hooks count every forward of the model it hooks
    engine = Engine(twin, batch_dim=None)
    weighting = UPGradWeighting()

    def rows() -> None:
        model.zero_grad(set_to_none=True)
        A.backward(losses_of(model, batch), model, agg, gramian="rows")

    def rows_vmap() -> None:
        model.zero_grad(set_to_none=True)
        A.backward(losses_of(model, batch), model, agg, gramian="rows", strategy="vmap")

    def streaming() -> None:
        model.zero_grad(set_to_none=True)
        A.backward(losses_of(model, batch), model, agg, gramian="streaming")

    def autogram() -> None:
        twin.zero_grad(set_to_none=True)
        losses = torch.stack(losses_of(twin, batch))
        w = weighting(engine.compute_gramian(losses))
        losses.backward(w)

    return {"rows": rows, "rows-vmap": rows_vmap, "streaming": streaming, "autogram": autogram}


def songoku_runners(
    model: nn.Module, batch: tuple[Tensor, Tensor], k: int
) -> dict[str, Callable[[], None]]:
    """A SON-GOKU step per path (persistent schedulers, for timing) and a fresh scheduler's
    first three steps per path (for the peak memory), keyed ``"rows"``, ``"streaming"``,
    ``"fresh-rows"``, ``"fresh-streaming"``."""

    def task(i: int) -> TaskSpec:
        def loss(m: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
            return nn.functional.cross_entropy(m.heads[i](m.trunk(b[0])), b[1][:, i])

        return TaskSpec(f"t{i}", loss)

    def make(rows: str) -> SonGokuScheduler:
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        tau = TauSchedule("constant", tau_target=1.0)  # one group: every task active
        tasks = [task(i) for i in range(k)]
        return SonGokuScheduler(model, tasks, opt, tau_schedule=tau, sketch_dim=256, rows=rows)

    steps = {f"t{i}": batch for i in range(k)}

    def persistent(rows: str) -> Callable[[], None]:
        sched = make(rows)

        def run() -> None:
            sched.step(steps)

        return run

    def fresh(rows: str) -> Callable[[], None]:
        def run() -> None:
            sched = make(rows)
            for _ in range(3):
                sched.step(steps)

        return run

    return {
        "rows": persistent("rows"),
        "streaming": persistent("streaming"),
        "fresh-rows": fresh("rows"),
        "fresh-streaming": fresh("streaming"),
    }


def songoku_table(device: torch.device, ks: list[int], rounds: int, batch_size: int) -> None:
    """The SON-GOKU rows-vs-streaming table (module docstring)."""
    print(
        "| model | K | rows ms | streaming ms | rows / streaming | peak MiB rows / streaming "
        "| K × n MiB (the rows) | bound MiB (params + K·leaf + fwd) |"
    )
    print("|---" * 8 + "|")
    for k in ks:
        model, x, y = build("MLP-1.8M", k, batch_size, device)
        run = songoku_runners(model, (x, y), k)
        timed = {name: run[name] for name in ("rows", "streaming")}
        t = interleave(timed, device, rounds=rounds, warmup=2)
        mem = {name: peak_mib(run[f"fresh-{name}"], model, device) for name in timed}
        params = list(model.parameters())
        one = sum(p.numel() * p.element_size() for p in params) / 2**20
        leaf = max(p.numel() * p.element_size() for p in params) / 2**20
        bound = one + k * leaf + forward_peak(model, (x, y), device)
        print(
            f"| MLP-1.8M | {k} | {t['rows'].ms()} | {t['streaming'].ms()} "
            f"| {ratio_spread(t['rows'], t['streaming'])} "
            f"| {mem['rows']:.1f} / {mem['streaming']:.1f} | {k * one:.1f} | {bound:.1f} |",
            flush=True,
        )
    print("\nratios > 1: streaming faster (median [min–max] of the per-round ratios).")


def forward_peak(model: nn.Module, batch: tuple[Tensor, Tensor], device: torch.device) -> float:
    """The forward's own peak (the activations autograd saves), in MiB."""
    box: list[list[Tensor]] = []
    mib = peak_mib(lambda: box.append(losses_of(model, batch)), model, device)
    box.clear()
    return mib


def build(
    name: str, k: int, batch_size: int, device: torch.device
) -> tuple[nn.Module, Tensor, Tensor]:
    y = torch.randint(0, 10, (batch_size, k), device=device)
    if name == "MLP":
        return MLPHeads(k).to(device), torch.randn(batch_size, 256, device=device), y
    if name == "MLP-1.8M":
        return LargeMLPHeads(k).to(device), torch.randn(batch_size, 512, device=device), y
    return CNNHeads(k).to(device), torch.randn(batch_size, 1, 16, 16, device=device), y


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="K in {2, 8}, few rounds")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per cell")
    parser.add_argument("--songoku", action="store_true", help="the SON-GOKU table only")
    add_common_args(parser)
    args = parser.parse_args()
    device = setup(args)
    torch.manual_seed(0)
    ks = [2, 8] if args.quick else [2, 8, 32]
    rounds = args.rounds or (3 if args.quick else 7)
    batch_size = 64
    if args.songoku:
        print(f"{environment(device)}, batch {batch_size}, SON-GOKU, {rounds} interleaved rounds\n")
        songoku_table(device, [2] if args.quick else [8, 32], rounds, batch_size)
        return
    print(f"{environment(device)}, batch {batch_size}, UPGrad, {rounds} interleaved rounds\n")
    print(
        "| model | K | rows ms | rows / streaming | rows-vmap / streaming | autogram / streaming "
        "| peak MiB rows / rows-vmap / streaming / autogram | bound MiB (params + K·leaf + fwd) |"
    )
    print("|---" * 7 + "|")
    cells = [(m, k) for m in ("MLP", "CNN") for k in ks] + [("MLP-1.8M", 8)]
    for model_name, k in cells:
        model, x, y = build(model_name, k, batch_size, device)
        run = runners(model, (x, y))
        t = interleave(run, device, rounds=rounds, warmup=2)
        mem = {name: peak_mib(fn, model, device) for name, fn in run.items()}
        params = list(model.parameters())
        one = sum(p.numel() * p.element_size() for p in params) / 2**20
        leaf = max(p.numel() * p.element_size() for p in params) / 2**20
        bound = one + k * leaf + forward_peak(model, (x, y), device)
        print(
            f"| {model_name} | {k} | {t['rows'].ms()} "
            f"| {ratio_spread(t['rows'], t['streaming'])} "
            f"| {ratio_spread(t['rows-vmap'], t['streaming'])} "
            f"| {ratio_spread(t['autogram'], t['streaming'])} "
            f"| {mem['rows']:.1f} / {mem['rows-vmap']:.1f} / {mem['streaming']:.1f} / "
            f"{mem['autogram']:.1f} | {bound:.1f} |",
            flush=True,
        )
    print(
        "\nratios > 1: streaming faster (median [min–max] of the per-round ratios). Targets: "
        "rows / streaming ≥ 1/1.3 ≈ 0.77, autogram / streaming ≥ 1, streaming peak ≤ bound."
    )


if __name__ == "__main__":
    main()
