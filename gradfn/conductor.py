"""GradientConductor (GCond) as a pure transform (gcond spec §2; DESIGN.md layer 4).

``conductor(loss_fn, lambdas, accumulation_steps=N, ...)`` returns a :class:`~gradfn.base.Transform`:

* ``init(params) -> ConductorState``
* ``update(state, params, microbatches) -> (state, grads)`` runs one accumulation cycle over ``N``
  micro-batches (a sequence of ``N`` batches, or a callable returning the next batch, called ``N``
  times) and returns ONE gradient with the structure of ``params``.

``loss_fn(params, batch)`` returns the ``K`` task losses (dict / tuple / list / 1-D tensor, as for
:func:`gradfn.autodiff.value_and_per_task_grads`); ``lambdas`` holds ``K`` weights.

A cycle has two parts:

1. :func:`accumulate` (eager): ``A_k = λ_k · (1/D) Σ_{b ∈ B_k} ∇L_k(θ; b)``.
   *Classic* (``stochastic=False``): every loss on every micro-batch, from ONE forward per
   micro-batch shared by all losses (``D = N``). *Stochastic*: loss ``k`` on its own block of
   ``S = N/K`` micro-batches, one forward + one backward each (``D = S``); ``N % K != 0`` is an
   error when the transform is built.
2. :func:`process` (pure, compiles with ``torch.compile(fullgraph=True)``): the Gramian of the ``A_k``,
   norm EMA, per-loss norm cap, conflict resolution in coefficient space (:mod:`gradfn.resolve`),
   ``G = Σ_k A_k`` resolved, momentum (or Lion / trust ratio), all stats of spec §2.13 into the state.
   A non-finite loss, gradient or Gramian skips the cycle: the algorithm state is left as it was,
   ``state.skipped`` is set and the returned gradient is zeros.

Defaults fix the reference's defects (spec §5 / §6); :func:`reference_options` gives the keyword
arguments that reproduce the reference instead:

* accumulation and momentum in float32 (reference: bfloat16, ``accumulation_dtype=torch.bfloat16``);
* stability against the RAW previous per-loss gradients (reference: capped + projected,
  ``stability_source="processed"``, §5.1);
* ``min_cosine_sim`` is the true minimum over valid pairs (reference: 1.0 unless below the weak
  threshold, ``min_cosine="reference"``, §5.4);
* weak-zone pairs of the smooth rule are not recorded in the dominance history (their projection is
  symmetric, the winner does not matter; reference: recorded, ``arbitrate_weak=True``, §5.2–§5.3);
* a gradient is skipped by the pair search when its norm is below ``eps`` (reference: squared norm
  below ``eps``, ``norm_floor=sqrt(eps)``);
* ``norm_cap`` also applies with one loss (reference: ignored, ``cap_single_loss=False``, §5.10);
* non-finite cycles are skipped (reference: none, NaN poisons the state, §4).

Distributed training (``reduce``, e.g. :func:`gradfn.distributed.make_reducer`): after the
accumulation each rank averages its task-stacked ``A_k`` and the losses across ranks (``K·n + 2K``
values per cycle, float32, bucketed) BEFORE the Gramian, the norm EMA, the resolution and the
arbitrator, so every rank takes the same decisions and returns the same gradient with nothing else
communicated; with mean-reduced losses and equal per-rank micro-batches this is one process on the
union of the micro-batches (the reference instead resolves per rank and all-reduces the output,
gcond spec §2.10).

Loss scaling (``update(..., loss_scale=s)``, a 0-d tensor such as
``GradScaler.scale(torch.ones(()))``): the losses are multiplied by ``s`` before differentiation
and the accumulated gradients and losses divided by ``s`` (in float32) before anything else
(:mod:`gradfn.amp`); the state and the returned gradient are unscaled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from gradfn import tree
from gradfn._checks import check_float, check_int
from gradfn.amp import scale_losses, unscale
from gradfn.arbitrator import DominanceRule, init_history, update_norm_ema
from gradfn.autodiff import (
    accumulate_per_task_grads,
    value_and_per_task_grads,
    value_and_weighted_grad,
)
from gradfn.base import Transform
from gradfn.resolve import Rule, check_thresholds, cross_gramian, resolve_gramian
from gradfn.transforms import MomentumState, cap_factors, momentum, sign_trust_ratio

__all__ = [
    "ConductorConfig",
    "ConductorState",
    "accumulate",
    "conductor",
    "discard_cycle",
    "init_state",
    "make_config",
    "process",
    "reference_options",
]

PyTree = Any


class ConductorConfig(NamedTuple):
    """Hyper-parameters of :func:`conductor` (Python values, validated by :func:`conductor`)."""

    num_tasks: int
    lambdas: tuple[float, ...]
    accumulation_steps: int
    stochastic: bool = True
    thresholds: tuple[float, float, float] = (-0.8, -0.5, 0.0)
    rule: Rule = "smooth"
    max_iters: int | None = None
    remap_power: float = 2.0
    norm_cap: float | None = None
    norm_ema_beta: float = 0.95
    momentum_beta: float = 0.85
    use_lion: bool = False
    trust_ratio_coef: float = 1e-4
    trust_ratio_clip: float = 100.0
    dominance_window: int = 3
    dominance: DominanceRule = "loses"
    tie_breaking_weights: tuple[float, float] = (0.8, 0.2)
    return_raw_grad: bool = False
    eps: float = 1e-8
    accumulation_dtype: torch.dtype = torch.float32
    stability_source: Literal["raw", "processed"] = "raw"
    min_cosine: Literal["true", "reference"] = "true"
    arbitrate_weak: bool = False
    norm_floor: float | None = None
    cap_single_loss: bool = True
    strategy: str = "auto"
    skip_guard: bool = True


class ConductorState(NamedTuple):
    """State of :func:`conductor`: algorithm state, then the last cycle's statistics (spec §2.13).

    Algorithm state (left unchanged by a skipped cycle):

    * ``momentum``: :class:`~gradfn.transforms.MomentumState` (``count`` = the reference's ``step``).
    * ``prev`` (task-stacked, K leading) and ``prev_sq_norms`` (K,): last cycle's per-loss
      gradients for the arbitrator's stability (raw, or capped + projected).
    * ``norm_ema`` (K,), ``history`` (W,) int64 winner ring.

    Statistics of the last cycle: ``losses`` (K,) λ-weighted mean losses (``loss/<k>``),
    ``raw_losses`` (K,) unweighted, ``raw_norms`` (K,) ``||A_k||`` before the cap, ``proj_iters``,
    ``min_cosine_sim``, ``min_cosine_after``, ``final_grad_norm``, ``winners`` (T,), ``skipped``
    (bool) and ``num_skipped`` (int64, total).
    """

    momentum: MomentumState
    prev: PyTree
    prev_sq_norms: Tensor
    norm_ema: Tensor
    history: Tensor
    losses: Tensor
    raw_losses: Tensor
    raw_norms: Tensor
    proj_iters: Tensor
    min_cosine_sim: Tensor
    min_cosine_after: Tensor
    final_grad_norm: Tensor
    winners: Tensor
    skipped: Tensor
    num_skipped: Tensor

    @property
    def step(self) -> Tensor:
        """Number of momentum updates (the reference's ``step`` stat)."""
        return self.momentum.count


def reference_options(eps: float = 1e-8) -> dict[str, Any]:
    """Keyword arguments of :func:`conductor` that reproduce the reference's defects (spec §5)."""
    return {
        "accumulation_dtype": torch.bfloat16,
        "stability_source": "processed",
        "min_cosine": "reference",
        "arbitrate_weak": True,
        "norm_floor": math.sqrt(eps),
        "cap_single_loss": False,
    }


# ---------------------------------------------------------------------------------------------
# construction-time validation


def _lambdas(lambdas: Any) -> tuple[float, ...]:
    if isinstance(lambdas, Tensor):
        if lambdas.dim() != 1:
            raise ValueError(f"`lambdas` must be 1-D (K,), got shape {tuple(lambdas.shape)}")
        values = lambdas.tolist()
    elif isinstance(lambdas, Sequence) and not isinstance(lambdas, str):
        values = list(lambdas)
    else:
        raise TypeError(f"`lambdas` must be a sequence of K numbers, got {type(lambdas).__name__}")
    if not values:
        raise ValueError("`lambdas` is empty: there must be at least one loss")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"`lambdas` must hold finite numbers, got {values!r}")
    return tuple(float(v) for v in values)


def make_config(lambdas: Any, accumulation_steps: int, **kwargs: Any) -> ConductorConfig:
    """Validate the arguments of :func:`conductor` and bundle them (errors name the argument)."""
    lam = _lambdas(lambdas)
    k = len(lam)
    n = check_int("accumulation_steps", accumulation_steps, 1)
    cfg = ConductorConfig(num_tasks=k, lambdas=lam, accumulation_steps=n, **kwargs)
    if cfg.stochastic and n % k != 0:
        raise ValueError(
            f"stochastic accumulation gives each of the K={k} losses N/K micro-batches: "
            f"`accumulation_steps` (N={n}) must be divisible by K={k}"
        )
    check_thresholds(cfg.thresholds, "conflict_thresholds")
    if cfg.rule not in ("smooth", "zones"):
        raise ValueError(f"`rule` must be 'smooth' or 'zones', got {cfg.rule!r}")
    if cfg.max_iters is not None:
        check_int("projection_max_iters", cfg.max_iters, 0)
    if not (isinstance(cfg.remap_power, (int, float)) and cfg.remap_power > 0):
        raise ValueError(f"`remap_power` must be > 0, got {cfg.remap_power!r}")
    if cfg.norm_cap is not None and not (
        isinstance(cfg.norm_cap, (int, float)) and cfg.norm_cap > 0
    ):
        raise ValueError(f"`norm_cap` must be None or a number > 0, got {cfg.norm_cap!r}")
    check_float("norm_ema_beta", cfg.norm_ema_beta, 0.0, 1.0)
    check_float("momentum_beta", cfg.momentum_beta, 0.0, 1.0)
    if not (isinstance(cfg.trust_ratio_coef, (int, float)) and cfg.trust_ratio_coef > 0):
        raise ValueError(f"`trust_ratio_coef` must be > 0, got {cfg.trust_ratio_coef!r}")
    if not (isinstance(cfg.trust_ratio_clip, (int, float)) and cfg.trust_ratio_clip > 0):
        raise ValueError(f"`trust_ratio_clip` must be > 0, got {cfg.trust_ratio_clip!r}")
    check_int("dominance_window", cfg.dominance_window, 0)
    if cfg.dominance not in ("loses", "wins"):
        raise ValueError(f"`dominance` must be 'loses' or 'wins', got {cfg.dominance!r}")
    w = tuple(cfg.tie_breaking_weights)
    if len(w) != 2 or not all(isinstance(x, (int, float)) and x >= 0 for x in w) or sum(w) <= 0:
        raise ValueError(
            "`tie_breaking_weights` must be 2 non-negative numbers (stability, strength) with a "
            f"positive sum, got {cfg.tie_breaking_weights!r}"
        )
    if not (isinstance(cfg.eps, (int, float)) and cfg.eps > 0):
        raise ValueError(f"`eps` must be > 0, got {cfg.eps!r}")
    if cfg.accumulation_dtype not in (torch.float32, torch.float64, torch.bfloat16):
        raise ValueError(
            "`accumulation_dtype` must be torch.float32, torch.float64 or torch.bfloat16, "
            f"got {cfg.accumulation_dtype!r}"
        )
    if cfg.stability_source not in ("raw", "processed"):
        raise ValueError(
            f"`stability_source` must be 'raw' or 'processed', got {cfg.stability_source!r}"
        )
    if cfg.min_cosine not in ("true", "reference"):
        raise ValueError(f"`min_cosine` must be 'true' or 'reference', got {cfg.min_cosine!r}")
    if cfg.norm_floor is not None and not (
        isinstance(cfg.norm_floor, (int, float)) and cfg.norm_floor >= 0
    ):
        raise ValueError(f"`norm_floor` must be None or a number >= 0, got {cfg.norm_floor!r}")
    if cfg.strategy not in ("auto", "vmap", "loop"):
        raise ValueError(f"`strategy` must be 'auto', 'vmap' or 'loop', got {cfg.strategy!r}")
    return cfg._replace(
        thresholds=tuple(float(x) for x in cfg.thresholds),
        tie_breaking_weights=tuple(float(x) for x in w),
    )


# ---------------------------------------------------------------------------------------------
# the two halves of a cycle


def init_state(config: ConductorConfig, params: PyTree) -> ConductorState:
    """Initial state: zero momentum and previous gradients, norm EMAs at 1.0, empty history."""
    k = config.num_tasks
    leaf0 = tree.leaves(params)[0]
    device = leaf0.device
    dt = config.accumulation_dtype
    mom = momentum(config.momentum_beta, dtype=dt).init(params)
    prev = tree.tree_map(lambda p: torch.zeros((k, *p.shape), dtype=dt, device=device), params)
    t = 2 * k if config.max_iters is None else config.max_iters
    f32 = dict(dtype=torch.float32, device=device)
    return ConductorState(
        momentum=mom,
        prev=prev,
        prev_sq_norms=torch.zeros(k, **f32),
        norm_ema=torch.ones(k, **f32),
        history=init_history(config.dominance_window, device),
        losses=torch.zeros(k, **f32),
        raw_losses=torch.zeros(k, **f32),
        raw_norms=torch.zeros(k, **f32),
        proj_iters=torch.zeros((), dtype=torch.int64, device=device),
        min_cosine_sim=torch.ones((), **f32),
        min_cosine_after=torch.ones((), **f32),
        final_grad_norm=torch.zeros((), **f32),
        winners=torch.full((t,), -1, dtype=torch.int64, device=device),
        skipped=torch.zeros((), dtype=torch.bool, device=device),
        num_skipped=torch.zeros((), dtype=torch.int64, device=device),
    )


def _batches(microbatches: Any, n: int) -> Callable[[], Any]:
    """A zero-argument callable returning the next of the ``n`` micro-batches."""
    if callable(microbatches):
        return microbatches
    if isinstance(microbatches, Sequence) and not isinstance(microbatches, (str, bytes)):
        if len(microbatches) != n:
            raise ValueError(
                f"`microbatches` holds {len(microbatches)} batches but accumulation_steps={n}"
            )
        it = iter(microbatches)
        return lambda: next(it)
    raise TypeError(
        "`microbatches` must be a sequence of N batches or a callable returning the next batch, "
        f"got {type(microbatches).__name__}"
    )


def accumulate(
    config: ConductorConfig, loss_fn: Callable, params: PyTree, microbatches: Any
) -> tuple[PyTree, Tensor, Tensor]:
    """One accumulation cycle (spec §2.2): ``(A task-stacked, λ-weighted losses (K,), raw losses)``.

    ``A_k = λ_k·(1/D)·Σ_b ∇L_k(θ; b)`` accumulated in ``config.accumulation_dtype`` (each micro-batch
    term rounded to it before it is added, as the reference does in bfloat16).

    Classic mode in float32 / float64 adds each micro-batch's per-task gradients straight into the
    task-stacked buffers (:func:`gradfn.autodiff.accumulate_per_task_grads`: no stacked copy per
    micro-batch with the loop strategy) and applies ``λ_k / N`` once at the end.
    """
    k, n, dt = config.num_tasks, config.accumulation_steps, config.accumulation_dtype
    next_batch = _batches(microbatches, n)
    device = tree.leaves(params)[0].device
    lam = torch.tensor(config.lambdas, dtype=torch.float32, device=device)
    raw_losses = torch.zeros(k, dtype=torch.float32, device=device)
    # fresh buffers every cycle (the state may keep the previous cycle's A as `prev`); the first
    # micro-batch writes them, the others add in place
    acc = tree.tree_map(lambda p: torch.empty((k, *p.shape), dtype=dt, device=p.device), params)
    acc_leaves = tree.leaves(acc)
    if not config.stochastic and dt != torch.bfloat16:
        for a in acc_leaves:
            a.zero_()
        for _ in range(n):
            losses = accumulate_per_task_grads(
                loss_fn, params, next_batch(), acc, strategy=config.strategy, num_tasks=k
            )
            raw_losses = raw_losses + losses.float() / n
        scale = (lam / n).to(dt)
        for a in acc_leaves:
            a.mul_(scale.reshape((k,) + (1,) * (a.dim() - 1)))
        return acc, raw_losses * lam, raw_losses
    if not config.stochastic:  # bfloat16: round each term before adding it, as the reference
        scale = lam / n
        for step in range(n):
            losses, grads = value_and_per_task_grads(
                loss_fn, params, next_batch(), strategy=config.strategy, num_tasks=k
            )
            for a, g in zip(acc_leaves, tree.leaves(grads), strict=True):
                term = (g.float() * scale.reshape((k,) + (1,) * (g.dim() - 1))).to(dt)
                if step == 0:
                    a.copy_(term)
                else:
                    a.add_(term)
            raw_losses = raw_losses + losses.detach().float() / n
        return acc, raw_losses * lam, raw_losses
    s = n // k
    eye = torch.eye(k, dtype=torch.float32, device=device)
    for task in range(k):
        weight = eye[task] * (config.lambdas[task] / s)
        for step in range(s):
            losses, grad = value_and_weighted_grad(
                loss_fn, params, next_batch(), weight, num_tasks=k
            )
            for a, g in zip(acc_leaves, tree.leaves(grad), strict=True):
                if step == 0:
                    a[task].copy_(g)
                else:
                    a[task].add_(g.to(dt))
            raw_losses = raw_losses + eye[task] * losses.detach().float()[task] / s
    return acc, raw_losses * lam, raw_losses


def process(
    config: ConductorConfig,
    state: ConductorState,
    grads: PyTree,
    losses: Tensor,
    raw_losses: Tensor,
    params: PyTree,
) -> tuple[ConductorState, PyTree]:
    """Resolve + momentum for one cycle (spec §2.3–§2.8); pure, compiles with ``fullgraph=True``.

    ``grads``: the accumulated task-stacked ``A_k`` (K leading); ``losses`` / ``raw_losses``:
    statistics (K,). Returns the new state and the gradient to hand to the optimizer (float32, or
    bfloat16 with a bfloat16 ``accumulation_dtype``, except ``return_raw_grad`` which is float32).
    """
    eps = config.eps
    k = config.num_tasks
    a = tree.tree_map(lambda g: g.float(), grads)
    gram_raw = tree.gramian(a)
    raw_norms = torch.sqrt(torch.clamp(torch.diagonal(gram_raw), min=0.0))
    ema = update_norm_ema(state.norm_ema, raw_norms, config.norm_ema_beta, eps)
    if k == 1 and not config.cap_single_loss:
        scale = torch.ones_like(raw_norms)
    else:
        scale = cap_factors(raw_norms, config.norm_cap, eps)
    gram = gram_raw * scale[:, None] * scale[None, :]
    cross = cross_gramian(a, state.prev) * scale[:, None]
    res = resolve_gramian(
        gram,
        config.thresholds,
        rule=config.rule,
        max_iters=config.max_iters,
        remap_power=config.remap_power,
        eps=eps,
        norm_floor=config.norm_floor,
        norm_ema=ema,
        prev_cross=cross,
        prev_sq_norms=state.prev_sq_norms,
        history=state.history,
        tie_breaking_weights=config.tie_breaking_weights,
        dominance=config.dominance,
        arbitrate_weak=config.arbitrate_weak,
    )
    total = tree.weighted_sum(a, res.weights * scale)  # G = Σ_k resolved A_k (float32)

    mom_t = momentum(config.momentum_beta, dtype=config.accumulation_dtype)
    mom_state, update = mom_t.update(state.momentum, total)
    if config.use_lion:
        trust = sign_trust_ratio(config.trust_ratio_coef, config.trust_ratio_clip, eps=eps)
        _, update = trust.update((), update, params)
    out = total if config.return_raw_grad else update

    if config.stability_source == "raw":
        prev = tree.tree_map(lambda g: g.to(config.accumulation_dtype), grads)
        prev_sq = torch.diagonal(gram_raw)
    else:
        prev = tree.tree_map(
            lambda g: g.to(config.accumulation_dtype),
            tree.combine(res.coefficients * scale[None, :], a),
        )
        prev_sq = torch.diagonal(res.gramian)

    if config.min_cosine == "true":
        min_cos = res.min_cosine_before
    else:
        min_cos = torch.where(
            res.min_cosine_before < config.thresholds[2],
            res.min_cosine_before,
            torch.ones_like(res.min_cosine_before),
        )

    # a NaN / Inf anywhere in the gradients shows in the Gramian's diagonal (sums of squares); an
    # overflowing Gramian is as unusable, so one K×K check covers both
    bad = ~torch.isfinite(gram_raw).all() | ~torch.isfinite(losses).all()
    if config.skip_guard:
        out = tree.tree_map(lambda x: torch.where(bad, 0.0, x), out)
    out_sq = [torch.linalg.vector_norm(x.float()) ** 2 for x in tree.leaves(out)]
    new = ConductorState(
        momentum=mom_state,
        prev=prev,
        prev_sq_norms=prev_sq,
        norm_ema=ema,
        history=res.history,
        losses=losses.float(),
        raw_losses=raw_losses.float(),
        raw_norms=raw_norms,
        proj_iters=res.iterations,
        min_cosine_sim=min_cos.float(),
        min_cosine_after=res.min_cosine_after.float(),
        final_grad_norm=torch.sqrt(torch.stack(out_sq).sum()),
        winners=res.winners,
        skipped=bad,
        num_skipped=state.num_skipped + bad.to(torch.int64),
    )
    if not config.skip_guard:
        return new, out
    return ConductorState(
        momentum=tree.tree_where(bad, state.momentum, new.momentum),
        prev=tree.tree_where(bad, state.prev, new.prev),
        prev_sq_norms=torch.where(bad, state.prev_sq_norms, new.prev_sq_norms),
        norm_ema=torch.where(bad, state.norm_ema, new.norm_ema),
        history=torch.where(bad, state.history, new.history),
        **{f: getattr(new, f) for f in _STATS},
    ), out


_ALGORITHM = ("momentum", "prev", "prev_sq_norms", "norm_ema", "history")
_STATS = ConductorState._fields[len(_ALGORITHM) :]


def discard_cycle(old: ConductorState, new: ConductorState) -> ConductorState:
    """The state after a skipped cycle: ``old``'s algorithm state with ``new``'s statistics
    (``final_grad_norm`` 0: the guarded transform returns zeros).

    For callers that build the transform with ``skip_guard=False`` and read ``new.skipped`` on the
    host anyway (the nn.Module adapter does, for its stats): selecting the old tensors costs nothing,
    where the in-graph guard copies the previous gradients and the momentum through
    ``torch.where``.
    """
    state = ConductorState(
        **{f: getattr(old, f) for f in _ALGORITHM}, **{f: getattr(new, f) for f in _STATS}
    )
    return state._replace(final_grad_norm=torch.zeros_like(new.final_grad_norm))


# ---------------------------------------------------------------------------------------------
# the transform


def conductor(
    loss_fn: Callable[[PyTree, Any], Any],
    lambdas: Sequence[float] | Tensor,
    *,
    accumulation_steps: int,
    stochastic: bool = True,
    thresholds: Sequence[float] = (-0.8, -0.5, 0.0),
    rule: Rule = "smooth",
    max_iters: int | None = None,
    remap_power: float = 2.0,
    norm_cap: float | None = None,
    norm_ema_beta: float = 0.95,
    momentum_beta: float = 0.85,
    use_lion: bool = False,
    trust_ratio_coef: float = 1e-4,
    trust_ratio_clip: float = 100.0,
    dominance_window: int = 3,
    dominance: DominanceRule = "loses",
    tie_breaking_weights: Sequence[float] = (0.8, 0.2),
    return_raw_grad: bool = False,
    eps: float = 1e-8,
    accumulation_dtype: torch.dtype = torch.float32,
    stability_source: Literal["raw", "processed"] = "raw",
    min_cosine: Literal["true", "reference"] = "true",
    arbitrate_weak: bool = False,
    norm_floor: float | None = None,
    cap_single_loss: bool = True,
    strategy: str = "auto",
    skip_guard: bool = True,
    compile: bool | str = False,
    reduce: Callable[[PyTree], PyTree] | None = None,
) -> Transform:
    """GradientConductor as ``(init, update)``; see the module docstring.

    Args (reference name in brackets where it differs):
        loss_fn: ``loss_fn(params, batch)`` → the ``K`` task losses.
        lambdas: ``K`` loss weights, applied to each micro-batch loss (spec §2.6).
        accumulation_steps: ``N`` micro-batches per cycle.
        stochastic: [stochastic_accumulation] each loss on its own ``N/K`` micro-batches.
        thresholds: [conflict_thresholds] ``(critical, main, weak)``.
        rule: ``"smooth"`` [use_smooth_logic=True] or ``"zones"`` [False].
        max_iters: [projection_max_iters] ``None`` → ``2K``; ``0`` → no resolution.
        remap_power, norm_cap, norm_ema_beta, momentum_beta, use_lion, trust_ratio_coef,
        trust_ratio_clip, dominance_window, tie_breaking_weights, return_raw_grad, eps: as the
            reference (spec §1).
        dominance: ``"loses"`` (reference code) or ``"wins"`` (reference README).
        accumulation_dtype, stability_source, min_cosine, arbitrate_weak, norm_floor,
        cap_single_loss: the defect fixes listed in the module docstring
            (:func:`reference_options` restores the reference).
        strategy: per-task gradient strategy of the classic mode (``"auto"``, ``"vmap"``, ``"loop"``).
        skip_guard: keep the algorithm state of a non-finite cycle unchanged inside the graph (and
            return zeros). ``False``: the returned state and gradient are the cycle's, flagged by
            ``state.skipped``; the caller discards them (:func:`discard_cycle`). Saves the
            ``torch.where`` copies of the previous gradients and the momentum.
        compile: compile :func:`process` with ``torch.compile(fullgraph=True)``; ``True`` for the
            default backend or a backend name (``"aot_eager"``, ``"inductor"``).
        reduce: ``reduce(tree) -> tree`` averaging a pytree across ranks, applied to the
            accumulated ``A_k`` and losses before :func:`process` (module docstring); None: one
            process.

    Raises:
        ValueError: at construction, for a bad argument value, including ``N % K != 0`` in
            stochastic mode.
        TypeError: at construction, for an argument of the wrong type.
    """
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}")
    if reduce is not None and not callable(reduce):
        raise TypeError(f"`reduce` must be callable or None, got {type(reduce).__name__}")
    if not isinstance(compile, (bool, str)):
        raise TypeError(f"`compile` must be a bool or a backend name, got {compile!r}")
    config = make_config(
        lambdas,
        accumulation_steps,
        stochastic=bool(stochastic),
        thresholds=tuple(thresholds),
        rule=rule,
        max_iters=max_iters,
        remap_power=remap_power,
        norm_cap=norm_cap,
        norm_ema_beta=norm_ema_beta,
        momentum_beta=momentum_beta,
        use_lion=bool(use_lion),
        trust_ratio_coef=trust_ratio_coef,
        trust_ratio_clip=trust_ratio_clip,
        dominance_window=dominance_window,
        dominance=dominance,
        tie_breaking_weights=tuple(tie_breaking_weights),
        return_raw_grad=bool(return_raw_grad),
        eps=eps,
        accumulation_dtype=accumulation_dtype,
        stability_source=stability_source,
        min_cosine=min_cosine,
        arbitrate_weak=bool(arbitrate_weak),
        norm_floor=norm_floor,
        cap_single_loss=bool(cap_single_loss),
        strategy=strategy,
        skip_guard=bool(skip_guard),
    )

    def step(state, grads, losses, raw_losses, params):
        return process(config, state, grads, losses, raw_losses, params)

    if compile:
        backend = compile if isinstance(compile, str) else "inductor"
        step = torch.compile(step, fullgraph=True, backend=backend)

    def init(params: PyTree) -> ConductorState:
        return init_state(config, params)

    def update(
        state: ConductorState,
        params: PyTree,
        microbatches: Any,
        *,
        loss_scale: Tensor | None = None,
    ) -> tuple[ConductorState, PyTree]:
        fn = scale_losses(loss_fn, loss_scale)
        cycle = unscale(accumulate(config, fn, params, microbatches), loss_scale)
        if reduce is not None:
            cycle = reduce(cycle)  # (A, losses, raw_losses) averaged over the ranks
        grads, losses, raw_losses = cycle
        return step(state, grads, losses, raw_losses, params)

    return Transform(init, update)
