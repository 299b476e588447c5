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

Usage::

    python -m benchmarks.gramian            # K in {2, 8, 32}, and the 1.8 M-parameter MLP at K = 8
    python -m benchmarks.gramian --quick    # a smoke run
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
    add_common_args(parser)
    args = parser.parse_args()
    device = setup(args)
    torch.manual_seed(0)
    ks = [2, 8] if args.quick else [2, 8, 32]
    rounds = args.rounds or (3 if args.quick else 7)
    batch_size = 64
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
