"""The compared methods, each built as a *stepper*: ``stepper(params, batch) -> grads``.

A stepper returns one gradient per parameter (the structure of ``params``), or ``None`` for a
parameter the step did not touch (SON-GOKU: no active task reaches it); the runner writes it to
``.grad`` and takes one step of the shared optimizer, so every method gets the same model, the
same optimizer and the same number of optimizer steps on the same mini-batches.

* **Uniform**: one backward of ``Σ_k L_k``.
* **Aggregators** (PCGrad, MGDA, CAGrad, UPGrad, Nash-MTL; :mod:`gradfn.aggregators`): per-task
  gradients from one forward; the shared (trunk) gradients are aggregated, each head gets its
  own task's gradient.
* **GCond** (:func:`gradfn.conductor`): the mini-batch is cut into ``N`` micro-batches,
  one accumulation cycle per optimizer step (classic: every loss on every micro-batch; stochastic:
  each loss on its own ``N/K`` micro-batches). GCond resolves over all parameters (its API has no
  shared/head split) and applies its own momentum (β = 0.85) before the optimizer; the extra row
  *no internal momentum* (``momentum_beta=0``) separates the conflict resolution from that
  momentum. The rows *Adam β1 = 0* keep that momentum and follow the reference's recommended
  usage instead: the conductor owns the first moment, so the optimizer's own first moment is off
  (Adam ``betas=(0.0, 0.999)``, same learning rate; :data:`ADAM_BETAS`).
* **Loss weightings** (DWA, RLW, uncertainty, IMTL-L, FAMO, GradNorm) and **FairGrad**:
  :mod:`benchmarks.quality.weighting_methods`.
* **SON-GOKU** (:func:`gradfn.songoku.songoku`) and its variants: ``+ PCGrad`` (PCGrad inside the
  active group), **Static** (one colouring at the first refresh, never recoloured) and
  **Single-step** (``β = 0``: the graph from the latest gradients only) and the **refresh-only
  EMA** (``ema_mode="refresh"``: every task's EMA is updated at the refresh steps only). Two
  controls keep SON-GOKU's schedule but replace its groups after every refresh: **oracle groups**
  (the planted partition, fixed; planted problems only) and **random groups** (SON-GOKU's own
  colouring with the task labels randomly permuted: the same group sizes, re-drawn per refresh).

Every stepper carries the Adam ``betas`` the runner must use (:data:`ADAM_BETAS`, torch's
``(0.9, 0.999)`` unless listed there).

SON-GOKU steppers keep a ``trace``: the active mask of every step and, at each refresh, the step,
``τ``, the interference ``ρ`` and the conflict graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from benchmarks.quality.weighting_methods import (
    WEIGHTING_LABELS,
    WEIGHTING_METHODS,
    weighting_stepper,
)
from gradfn import aggregators, value_and_per_task_grads, value_and_weighted_grad

__all__ = [
    "ADAM_BETAS",
    "CONTROLS",
    "DEFAULT_BETAS",
    "LABELS",
    "METHODS",
    "MethodConfig",
    "build_method",
]

Grads = dict[str, Tensor | None]

LABELS: dict[str, str] = {
    "uniform": "Uniform (sum)",
    "pcgrad": "PCGrad",
    "mgda": "MGDA",
    "cagrad": "CAGrad",
    "upgrad": "UPGrad",
    "nash_mtl": "Nash-MTL",
    "gcond": "GCond (classic)",
    "gcond_stoch": "GCond (stochastic)",
    "gcond_nomom": "GCond (classic, no internal momentum)",
    "gcond_b1zero": "GCond (classic, Adam β1 = 0)",
    "gcond_stoch_b1zero": "GCond (stochastic, Adam β1 = 0)",
    "songoku": "SON-GOKU",
    "songoku_pcgrad": "SON-GOKU + PCGrad",
    "static": "Static one-shot colouring",
    "single_step": "Single-step (β = 0)",
    "songoku_refresh_ema": "SON-GOKU (refresh-only EMA)",
    "songoku_oracle": "Oracle groups (planted partition)",
    "songoku_random": "Random groups (same sizes)",
}
LABELS.update(WEIGHTING_LABELS)  # loss weightings and FairGrad: weighting_methods.py
METHODS: tuple[str, ...] = tuple(LABELS)
SONGOKU_FAMILY = (
    "songoku",
    "songoku_pcgrad",
    "static",
    "single_step",
    "songoku_refresh_ema",
    "songoku_oracle",
    "songoku_random",
)
# controls, not methods: run by the tuned protocol (the oracle where a partition is planted)
CONTROLS = ("songoku_oracle", "songoku_random")

DEFAULT_BETAS: tuple[float, float] = (0.9, 0.999)
# Adam betas that differ from torch's defaults, per method. GCond's reference recommends
# (AdamW with) betas=(0.0, β2): its internal momentum is the first moment.
ADAM_BETAS: dict[str, tuple[float, float]] = {
    "gcond_b1zero": (0.0, 0.999),
    "gcond_stoch_b1zero": (0.0, 0.999),
}


@dataclass
class MethodConfig:
    """Method hyper-parameters shared by every problem (the libraries' defaults unless noted)."""

    refresh_period: int = 32
    tau: float = 0.25
    ema_beta: float = 0.9
    gcond_classic_microbatches: int = 4
    cagrad_c: float = 0.5
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stepper:
    """``stepper(params, batch) -> grads``; ``trace`` holds SON-GOKU's schedule and graphs;
    ``adam_betas`` are the betas of the optimizer that takes the steps."""

    name: str
    fn: Callable[[dict[str, Tensor], Any], Grads]
    trace: dict[str, list] = field(default_factory=dict)
    adam_betas: tuple[float, float] = DEFAULT_BETAS

    def __call__(self, params: dict[str, Tensor], batch: Any) -> Grads:
        return self.fn(params, batch)


def _uniform(problem) -> Callable:
    ones = torch.ones(problem.num_tasks)

    def fn(params, batch):
        _, grads = value_and_weighted_grad(problem.loss_fn, params, batch, ones)
        return grads

    return fn


def _single_task(problem, k: int) -> Callable:
    """The single-task baseline of task ``k``: ``∇L_k`` only (the other heads stay None)."""
    onehot = torch.zeros(problem.num_tasks)
    onehot[k] = 1.0
    own = f"heads.{k}."

    def fn(params, batch):
        _, grads = value_and_weighted_grad(problem.loss_fn, params, batch, onehot)
        return {
            n: (g if problem.shared(n) or n.startswith(own) else None) for n, g in grads.items()
        }

    return fn


def _aggregated(problem, method: str, seed: int, cfg: MethodConfig) -> Callable:
    hparams: dict[str, Any] = {}
    if method == "pcgrad":
        hparams["seed"] = seed
    if method == "cagrad":
        hparams["c"] = cfg.cagrad_c
    agg = aggregators.aggregator(method, **hparams)
    box = {"state": agg.init(problem.num_tasks)}

    def fn(params, batch):
        _, grads = value_and_per_task_grads(problem.loss_fn, params, batch)
        shared = {n: g for n, g in grads.items() if problem.shared(n)}
        box["state"], out = agg.update(box["state"], shared)
        return {n: out.grad[n] if n in shared else g.sum(0) for n, g in grads.items()}

    return fn


def _gcond(problem, stochastic: bool, cfg: MethodConfig, **options: Any) -> Callable:
    from gradfn import conductor

    k = problem.num_tasks
    n = k if stochastic else cfg.gcond_classic_microbatches
    tx = conductor(
        problem.loss_fn, [1.0] * k, accumulation_steps=n, stochastic=stochastic, **options
    )
    box: dict[str, Any] = {}

    def fn(params, batch):
        if "state" not in box:
            box["state"] = tx.init(params)
        micro = problem.split(batch, n) if batch is not None else [None] * n
        box["state"], grads = tx.update(box["state"], params, micro)
        return grads

    return fn


def _songoku(problem, method: str, seed: int, cfg: MethodConfig) -> Stepper:
    from gradfn import songoku
    from gradfn.algorithms import touched_mask

    k = problem.num_tasks
    r = cfg.refresh_period
    tx = songoku(
        problem.loss_fn,
        num_tasks=k,
        shared=problem.shared,
        refresh_period=r,
        tau_schedule=cfg.tau,
        ema_beta=0.0 if method == "single_step" else cfg.ema_beta,
        ema_mode="refresh" if method == "songoku_refresh_ema" else "active",
        aggregator=aggregators.aggregator("pcgrad", seed=seed, reduction="mean")
        if method == "songoku_pcgrad"
        else None,
        seed=seed,
    )
    trace: dict[str, list] = {"active": [], "refresh": []}
    box: dict[str, Any] = {}
    oracle = _oracle_groups(problem) if method == "songoku_oracle" else None
    shuffle = torch.Generator().manual_seed(7919 + seed)

    def replace_groups(state):
        if oracle is not None:
            mask, g = oracle
            return state._replace(
                groups=mask, num_groups=torch.tensor(g), group_index=torch.tensor(0)
            )
        perm = torch.randperm(k, generator=shuffle)  # task k takes the place of task perm[k]
        return state._replace(groups=state.groups[:, perm])

    def record_refresh(state) -> None:
        trace["refresh"].append(
            {
                "step": int(state.step),
                "tau": float(state.tau),
                "rho": state.rho.tolist(),
                "adjacency": state.adjacency.tolist(),
                "num_groups": int(state.num_groups),
                # each task's first group (the colour; duplicated coverage ignored)
                "labels": state.groups.to(torch.int64).argmax(0).tolist(),
            }
        )

    def fn(params, batch):
        if "state" not in box:
            box["state"] = tx.init(params)
            if oracle is not None:
                box["state"] = replace_groups(box["state"])
            # which parameters each task reaches (the model's structure, computed once)
            box["usage"] = value_and_per_task_grads(
                problem.loss_fn, params, batch, return_usage=True
            )[2]
        state = box["state"]
        before = int(state.refreshes)
        if method == "static":
            # one colouring at the first refresh point, then the same groups forever
            state, grads = tx.step(state, params, batch)
            if before == 0 and int(state.step) == r and not bool(state.skipped):
                state = tx.refresh(state, params)
        else:
            state, grads = tx.update(state, params, batch)
        trace["active"].append(state.active.tolist())
        if int(state.refreshes) > before:
            if method in CONTROLS:
                state = replace_groups(state)
            record_refresh(state)
        box["state"] = state
        # untouched parameters (inactive heads, a skipped step) keep .grad = None, as in the
        # paper's Alg. 1 and the adapter: a zero gradient would still move them under Adam
        touched = touched_mask(state, box["usage"])
        return {n: (g if bool(touched[n]) else None) for n, g in grads.items()}

    return Stepper(method, fn, trace)


def _oracle_groups(problem) -> tuple[Tensor, int]:
    """The planted partition as a SON-GOKU ``(K, K)`` group mask and its group count."""
    part = problem.notes.get("group_of_task")
    if part is None:
        raise ValueError(f"songoku_oracle: problem {problem.name!r} has no planted partition")
    k, g = problem.num_tasks, max(part) + 1
    mask = torch.zeros(k, k, dtype=torch.bool)
    mask[torch.tensor(part), torch.arange(k)] = True
    return mask, g


def build_method(method: str, problem, seed: int, cfg: MethodConfig | None = None) -> Stepper:
    """The stepper of ``method`` (a key of :data:`LABELS`, or ``stl_k``: the single-task
    baseline of task ``k``) for ``problem``."""
    cfg = cfg or MethodConfig()
    if method == "uniform":
        return Stepper(method, _uniform(problem))
    if method in ("pcgrad", "mgda", "cagrad", "upgrad", "nash_mtl"):
        return Stepper(method, _aggregated(problem, method, seed, cfg))
    if method in ("gcond", "gcond_stoch", "gcond_b1zero", "gcond_stoch_b1zero"):
        stochastic = method in ("gcond_stoch", "gcond_stoch_b1zero")
        betas = ADAM_BETAS.get(method, DEFAULT_BETAS)
        return Stepper(method, _gcond(problem, stochastic, cfg), adam_betas=betas)
    if method == "gcond_nomom":
        return Stepper(method, _gcond(problem, False, cfg, momentum_beta=0.0))
    if method in SONGOKU_FAMILY:
        return _songoku(problem, method, seed, cfg)
    if method == "fairgrad":
        return Stepper(method, _aggregated(problem, method, seed, cfg))
    if method in WEIGHTING_METHODS:
        return Stepper(method, weighting_stepper(problem, method, seed, cfg.extra))
    if method.startswith("stl_") and method[4:].isdigit() and int(method[4:]) < problem.num_tasks:
        return Stepper(method, _single_task(problem, int(method[4:])))
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
