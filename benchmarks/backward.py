"""One training step with an aggregator: ``gradfn.aggregators.backward`` vs TorchJD vs LibMTL.

A step is ``zero_grad`` + forward + backward + aggregation, written into ``p.grad``. Two modes:

* **trunk-only** (the shared trunk's ``K``-row Jacobian aggregated, each head its own task's
  gradient): ``gradfn`` ``backward(losses, model, agg, shared=model.trunk)`` (``gradfn``) and
  ``features=h`` (``gradfn-feat``); TorchJD ``mtl_backward(losses, features=h)`` +
  ``jac_to_grad(trunk, agg)``; LibMTL's ``AbsWeighting._compute_grad(mode="backward")`` with its
  PCGrad / MGDA (LibMTL has no UPGrad).
* **full** (the Jacobian w.r.t. every parameter aggregated): ``backward(losses, model, agg)`` vs
  TorchJD ``autojac.backward(losses)`` + ``jac_to_grad(params, agg)``.

LibMTL 1.1.5 cannot be imported beside torch 2.13.0+cpu (it imports torchvision, whose wheels
need a CUDA torch), so its step is written out below from its source
(``LibMTL/weighting/abstract_weighting.py``, ``PCGrad.py``, ``MGDA.py``): ``K`` ``backward
(retain_graph=True)`` passes, each copying the shared ``.grad`` into a row of a flat
``(K, n)`` matrix, then the method's Python loop.

Timing: every runner of a (model, K, method) cell side by side in interleaved rounds
(:func:`benchmarks._common.interleave`), median and spread of the per-round ratios. Peak memory:
one step under ``torch.profiler(profile_memory=True)``, the running sum of the CPU allocator's
allocation and free events (sizes from the profiler's event tree), maximum over the step, from the
step's start (the model's parameters excluded; ``.grad`` are set to None before each step).
With ``--device cuda``: ``torch.cuda.max_memory_allocated`` over the step minus the memory
allocated before it.

Usage::

    python -m benchmarks.backward            # full table
    python -m benchmarks.backward --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable

import numpy as np
import torch
import torchjd.aggregation as tjd
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from torchjd.autojac import backward as tjd_backward
from torchjd.autojac import jac_to_grad, mtl_backward

import gradfn.aggregators as A
from benchmarks._common import (
    add_common_args,
    environment,
    interleave,
    progress,
    ratio_spread,
    setup,
)
from benchmarks.per_task_grads import CNNHeads, MLPHeads

TJD = {"upgrad": tjd.UPGrad, "mgda": tjd.MGDA, "pcgrad": tjd.PCGrad}


def losses_of(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, list[Tensor]]:
    x, y = batch
    h = model.trunk(x)
    return h, [nn.functional.cross_entropy(head(h), y[:, i]) for i, head in enumerate(model.heads)]


# --------------------------------------------------------------------------------------------
# LibMTL 1.1.5, written out (rep_grad=False, mode="backward", mgda_gn="none")


def _libmtl_grads(losses: list[Tensor], shared: list[Tensor]) -> Tensor:
    """``AbsWeighting._compute_grad``: K backward passes, ``_grad2vec`` into a ``(K, n)`` matrix."""
    index = [p.numel() for p in shared]
    k = len(losses)
    grads = torch.zeros(k, sum(index)).to(shared[0].device)
    for tn in range(k):
        losses[tn].backward(retain_graph=(tn + 1) != k)
        vec = torch.zeros(sum(index))
        beg = 0
        for p, m in zip(shared, index, strict=True):
            if p.grad is not None:
                vec[beg : beg + m] = p.grad.data.view(-1)
            beg += m
        grads[tn] = vec
        for p in shared:  # zero_grad_share_params
            if p.grad is not None:
                p.grad.zero_()
    return grads


def _libmtl_reset(new_grads: Tensor, shared: list[Tensor]) -> None:
    beg = 0
    for p in shared:
        m = p.numel()
        p.grad.data = new_grads[beg : beg + m].contiguous().view(p.data.size()).data.clone()  # type: ignore[union-attr]
        beg += m


def libmtl_pcgrad(losses: list[Tensor], shared: list[Tensor]) -> None:
    k = len(losses)
    batch_weight = np.ones(k)
    grads = _libmtl_grads(losses, shared)
    pc_grads = grads.clone()
    for tn_i in range(k):
        task_index = list(range(k))
        random.shuffle(task_index)
        for tn_j in task_index:
            g_ij = torch.dot(pc_grads[tn_i], grads[tn_j])
            if g_ij < 0:
                pc_grads[tn_i] -= g_ij * grads[tn_j] / (grads[tn_j].norm().pow(2))
                batch_weight[tn_j] -= (g_ij / (grads[tn_j].norm().pow(2))).item()
    _libmtl_reset(pc_grads.sum(0), shared)


def _min_norm_element_from2(v1v1, v1v2, v2v2):  # type: ignore[no-untyped-def]
    if v1v2 >= v1v1:
        return 0.999, v1v1
    if v1v2 >= v2v2:
        return 0.001, v2v2
    gamma = -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))
    return gamma, v2v2 + gamma * (v1v2 - v2v2)


def _min_norm_2d(grad_mat):  # type: ignore[no-untyped-def]
    dmin, sol = 1e8, None
    for i in range(grad_mat.size()[0]):
        for j in range(i + 1, grad_mat.size()[0]):
            c, d = _min_norm_element_from2(grad_mat[i, i], grad_mat[i, j], grad_mat[j, j])
            if d < dmin:
                dmin = d
                sol = [(i, j), c, d]
    return sol


def _projection2simplex(y):  # type: ignore[no-untyped-def]
    m = len(y)
    sorted_y = torch.sort(y, descending=True)[0]
    tmpsum = 0.0
    tmax_f = (torch.sum(y) - 1.0) / m
    for i in range(m - 1):
        tmpsum += sorted_y[i]
        tmax = (tmpsum - 1) / (i + 1.0)
        if tmax > sorted_y[i + 1]:
            tmax_f = tmax
            break
    return torch.max(y - tmax_f, torch.zeros(m).to(y.device))


def _next_point(cur_val, grad, n):  # type: ignore[no-untyped-def]
    proj_grad = grad - (torch.sum(grad) / n)
    tm1 = -1.0 * cur_val[proj_grad < 0] / proj_grad[proj_grad < 0]
    tm2 = (1.0 - cur_val[proj_grad > 0]) / (proj_grad[proj_grad > 0])
    t = torch.ones(1).to(grad.device)
    if (tm1 > 1e-7).sum() > 0:
        t = torch.min(tm1[tm1 > 1e-7])
    if (tm2 > 1e-7).sum() > 0:
        t = torch.min(t, torch.min(tm2[tm2 > 1e-7]))
    return _projection2simplex(proj_grad * t + cur_val)


def _find_min_norm_element(grads: Tensor) -> Tensor:
    grad_mat = grads.mm(grads.t())
    init_sol = _min_norm_2d(grad_mat)
    n = grads.size()[0]
    sol_vec = torch.zeros(n).to(grads.device)
    sol_vec[init_sol[0][0]] = init_sol[1]
    sol_vec[init_sol[0][1]] = 1 - init_sol[1]
    if n < 3:
        return sol_vec
    for _ in range(250):
        grad_dir = -1.0 * torch.matmul(grad_mat, sol_vec)
        new_point = _next_point(sol_vec, grad_dir, n)
        v1v1 = torch.sum(
            sol_vec.unsqueeze(1).repeat(1, n) * sol_vec.unsqueeze(0).repeat(n, 1) * grad_mat
        )
        v1v2 = torch.sum(
            sol_vec.unsqueeze(1).repeat(1, n) * new_point.unsqueeze(0).repeat(n, 1) * grad_mat
        )
        v2v2 = torch.sum(
            new_point.unsqueeze(1).repeat(1, n) * new_point.unsqueeze(0).repeat(n, 1) * grad_mat
        )
        nc, _ = _min_norm_element_from2(v1v1, v1v2, v2v2)
        new_sol_vec = nc * sol_vec + (1 - nc) * new_point
        if torch.sum(torch.abs(new_sol_vec - sol_vec)) < 1e-5:
            return sol_vec
        sol_vec = new_sol_vec
    return sol_vec


def libmtl_mgda(losses: list[Tensor], shared: list[Tensor]) -> None:
    grads = _libmtl_grads(losses, shared)
    gn = torch.ones(len(losses)).to(grads.device)  # mgda_gn="none"
    grads = grads / gn.unsqueeze(1).repeat(1, grads.size()[1])
    sol = _find_min_norm_element(grads)
    _libmtl_reset(torch.einsum("i, i... -> ...", sol, grads), shared)


LIBMTL: dict[str, Callable[[list[Tensor], list[Tensor]], None]] = {
    "pcgrad": libmtl_pcgrad,
    "mgda": libmtl_mgda,
}


# --------------------------------------------------------------------------------------------


def runners(model: nn.Module, batch, method: str) -> dict[str, Callable[[], None]]:
    k = len(model.heads)
    trunk = list(model.trunk.parameters())
    params = list(model.parameters())
    agg = A.aggregator(method)
    ref = TJD[method]()
    box: dict[str, object] = {}

    def gradfn_shared() -> None:
        model.zero_grad(set_to_none=True)
        _, losses = losses_of(model, batch)
        box["s"], _ = A.backward(losses, model, agg, state=box.get("s"), shared=model.trunk)

    def gradfn_feat() -> None:
        model.zero_grad(set_to_none=True)
        h, losses = losses_of(model, batch)
        box["f"], _ = A.backward(losses, model, agg, state=box.get("f"), features=h)

    def gradfn_full() -> None:
        model.zero_grad(set_to_none=True)
        _, losses = losses_of(model, batch)
        box["a"], _ = A.backward(losses, model, agg, state=box.get("a"))

    def torchjd_mtl() -> None:
        model.zero_grad(set_to_none=True)
        h, losses = losses_of(model, batch)
        mtl_backward(losses, features=h)
        jac_to_grad(trunk, ref)

    def torchjd_full() -> None:
        model.zero_grad(set_to_none=True)
        _, losses = losses_of(model, batch)
        tjd_backward(losses, inputs=params)
        jac_to_grad(params, ref)

    out = {
        "gradfn": gradfn_shared,
        "gradfn-feat": gradfn_feat,
        "torchjd": torchjd_mtl,
        "gradfn-full": gradfn_full,
        "torchjd-full": torchjd_full,
    }
    if method in LIBMTL:
        step = LIBMTL[method]

        def libmtl() -> None:
            model.zero_grad(set_to_none=True)
            _, losses = losses_of(model, batch)
            step(losses, trunk)

        out["libmtl"] = libmtl
    del k
    return out


def peak_mib(fn: Callable[[], None], model: nn.Module, device: torch.device) -> float:
    """Peak allocator bytes over one call (module docstring), in MiB."""
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())  # type: ignore[union-attr]
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag.name == "Allocation":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    events.sort()
    cur = peak = 0
    for _, size in events:
        cur += size
        peak = max(peak, cur)
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="K in {2, 8}, few rounds")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per cell")
    add_common_args(parser)
    args = parser.parse_args()
    device = setup(args)
    torch.manual_seed(0)
    random.seed(0)
    ks = [2, 8] if args.quick else [2, 8, 32]
    rounds = args.rounds or (3 if args.quick else 7)
    batch_size = 64
    print(f"{environment(device)}, batch {batch_size}, {rounds} interleaved rounds\n")
    header = (
        "| model | K | method | gradfn ms | torchjd / gradfn | libmtl / gradfn | "
        "feat / gradfn | torchjd-full / gradfn-full | peak MiB gradfn / feat / torchjd / libmtl "
        "| full: gradfn / torchjd |"
    )
    print(header)
    print("|---" * 10 + "|")
    for model_name, k in progress([(m, k) for m in ("MLP", "CNN") for k in ks], "backward"):
        y = torch.randint(0, 10, (batch_size, k), device=device)
        if model_name == "MLP":
            model: nn.Module = MLPHeads(k).to(device)
            x = torch.randn(batch_size, 256, device=device)
        else:
            model = CNNHeads(k).to(device)
            x = torch.randn(batch_size, 1, 16, 16, device=device)
        for method in ("upgrad", "mgda", "pcgrad"):
            run = runners(model, (x, y), method)
            t = interleave(run, device, rounds=rounds, warmup=2)
            mem = {name: peak_mib(fn, model, device) for name, fn in run.items()}
            lib = ratio_spread(t["libmtl"], t["gradfn"]) if "libmtl" in t else "—"
            lib_mem = f"{mem['libmtl']:.1f}" if "libmtl" in mem else "—"
            print(
                f"| {model_name} | {k} | {method} | {t['gradfn'].ms()} "
                f"| {ratio_spread(t['torchjd'], t['gradfn'])} | {lib} "
                f"| {ratio_spread(t['gradfn-feat'], t['gradfn'])} "
                f"| {ratio_spread(t['torchjd-full'], t['gradfn-full'])} "
                f"| {mem['gradfn']:.1f} / {mem['gradfn-feat']:.1f} / {mem['torchjd']:.1f} / "
                f"{lib_mem} | {mem['gradfn-full']:.1f} / {mem['torchjd-full']:.1f} |",
                flush=True,
            )
    print(
        "\nratios > 1: gradfn faster (median [min–max] over the rounds). feat / gradfn: the "
        "`features=` form over the `shared=` form (> 1: `shared=` faster)."
    )


if __name__ == "__main__":
    main()
