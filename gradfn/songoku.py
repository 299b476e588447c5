"""SON-GOKU as a pure transform (paper: "Graph Coloring for Multi-Task Learning"; DESIGN.md layer 4).

Every ``R`` steps the per-task EMAs ``e_k`` of the shared gradients give the interference
``ρ = −cos`` (:func:`gradfn.graph.interference`), a conflict graph ``E_τ = {(i, j): ρ_ij > τ}``
(:func:`gradfn.graph.conflict_adjacency`) and a Welsh–Powell colouring
(:func:`gradfn.coloring.color`). Each step activates one colour group ``S_t`` and returns the sum
of its tasks' gradients (paper Eq. 6): ``Σ_{k∈S_t} ∇L_k``.

``songoku(loss_fn, num_tasks=K, ...)`` returns a :class:`SonGokuTransform`, an ``(init, update)``
pair with two more pure functions:

* ``step(state, params, batch, probe=None) -> (state, grads)`` — the per-step path: no
  recolouring, tensor-only, compiles with ``torch.compile(fullgraph=True)``.
* ``refresh(state, params, batch=None, probe=None) -> state`` — the recolouring (``τ(t)``, graph,
  colouring, duplication), optionally after an EMA update on fresh per-task batches. Also
  tensor-only (its loops have fixed lengths), but meant to run eagerly every ``R`` steps.
* ``update(state, params, batch, refresh_batch=None)`` — the eager driver: ``step``, then
  ``refresh`` when the step count reaches a multiple of ``R``. It reads the step counter on the
  host once per call; a compiled training loop calls ``step`` (compiled) and ``refresh`` itself
  whenever its own counter ``t`` satisfies ``t % R == 0``.

Semantics (paper / the reference's documented scheduler, spec §1.9, with spec §5 fixed):

* until the first refresh every task is active (the τ warm-up); a refresh restarts the cycle at
  group 0 (``legacy_pointer=True`` reproduces the reference's start at group 1, §5.6);
* ``ema_mode="active"``: the EMAs of the active tasks are updated every step from the same pass
  (paper); ``"refresh"``: all ``K`` tasks are probed once per refresh window, on the step that
  triggers the refresh (one shared forward, no extra passes) or on ``refresh_batch``; EMAs start at
  zero (``e ← β e + (1−β) g``);
* with no in-group transform and ``ema_mode="refresh"``, a step is ONE backward of
  ``Σ_k w_k L_k`` with ``w`` the active mask (``reduction="mean"``: divided by ``|S_t|``);
  otherwise per-task gradients come from one forward and a batched backward;
* a non-finite loss (of an active task) or gradient skips the step: zero gradients, the state is
  unchanged apart from ``skipped=True`` and the last ``losses``.

Distributed training (``reduce``, e.g. :func:`gradfn.distributed.make_reducer`): every rank
computes its local per-task gradients, then averages them across ranks BEFORE any EMA, Gramian,
in-group transform or skip test, so every rank takes the same decisions from the same numbers (no
decision is broadcast); the losses in the state are averaged too. With mean-reduced losses and
equal per-rank batches this equals one process on the union of the batches. What one call
averages (float32, bucketed; ``n`` shared-and-head parameters, ``n_sh`` shared, ``|S|`` active
tasks, ``K`` tasks):

* one-backward step (``ema_mode="refresh"``, no in-group transform): the gradient, ``n + K``;
* per-task step: the per-task rows, ``|S|·n + K`` (``ema_mode="active"``; ``K·n + K`` on the
  step that probes every task in ``"refresh"`` mode); with a sketch and no in-group transform
  the sketches and the summed gradient instead, ``n + |S|·d_sk + K``;
* ``refresh`` with a batch: the observations, ``K·n_sh`` (or ``K·d_sk``) ``+ K``.

Loss scaling (``loss_scale``, a 0-d tensor such as ``GradScaler.scale(torch.ones(()))``): the
losses are multiplied by it before differentiation and the gradients divided by it (float32)
right after, so every decision, the EMAs and the returned gradient are unscaled.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Collection, Mapping
from typing import Any, Literal, NamedTuple

import optree
import torch
from torch import Tensor

from gradfn._checks import check_int
from gradfn._compat import is_compiling
from gradfn.amp import scale_losses, unscale
from gradfn.autodiff import (
    _loss_list,
    _stack_losses,
    value_and_per_task_grads,
    value_and_weighted_grad,
)
from gradfn.base import Transform
from gradfn.coloring import color, duplicate_min_coverage, groups_from_colors
from gradfn.graph import GRAPH_RULES, conflict_adjacency, interference
from gradfn.schedules import TauSchedule, tau_value
from gradfn.sketch import sketch
from gradfn.songoku_transforms import inverse_norm_weights, pcgrad_coefficients, pcgrad_order
from gradfn.tree import gramian, tree_where, weighted_sum

__all__ = ["BUILTIN_TRANSFORMS", "SonGokuState", "SonGokuTransform", "songoku"]

PyTree = Any
Params = Mapping[str, Tensor]
GradientTransform = Callable[[PyTree, Tensor], PyTree]
BUILTIN_TRANSFORMS: tuple[str, ...] = ("pcgrad", "pcgrad_sum", "inverse_norm", "adatask")


class SonGokuState(NamedTuple):
    """State of :func:`songoku` (all tensors; ``K`` tasks).

    Attributes:
        step: () int64 — completed steps ``t`` (skipped steps do not count).
        ptr: () int64 — index of the group that runs at the next step.
        groups: (K, K) bool — ``groups[g, k]``: task ``k`` is in group ``g``; rows
            ``≥ num_groups`` are unused.
        num_groups: () int64 — number of groups ``m`` in the cycle.
        ema: EMA of the shared gradients: task-stacked ``{name: (K, *shape)}``, or ``(K, d_sk)``
            with a sketch.
        ema_count: (K,) int64 — EMA updates received per task.
        rho: (K, K) float32 — interference ``−cos`` at the last refresh.
        adjacency: (K, K) bool — conflict graph at the last refresh.
        tau: () float32 — threshold used at the last refresh (NaN before the first).
        losses: (K,) float32 — task losses of the last step.
        active: (K,) bool — tasks of the last step's group.
        skipped: () bool — the last step was skipped (non-finite loss or gradient).
        norm_ema: (K,) float32 — EMA of ``‖g_k‖`` (inverse-norm weighting only).
        refreshes: () int64 — number of refreshes so far.
        seed: () int64 — seed of the PCGrad orders (hashed with ``step``).
    """

    step: Tensor
    ptr: Tensor
    groups: Tensor
    num_groups: Tensor
    ema: PyTree
    ema_count: Tensor
    rho: Tensor
    adjacency: Tensor
    tau: Tensor
    losses: Tensor
    active: Tensor
    skipped: Tensor
    norm_ema: Tensor
    refreshes: Tensor
    seed: Tensor


class SonGokuTransform(Transform):
    """``(init, update)`` of SON-GOKU, with ``step``, ``refresh`` and the bound settings.

    Unpacks as ``init, update = songoku(...)``; ``tx.step`` / ``tx.refresh`` are the per-step path
    and the recolouring (module docstring).
    """

    def __new__(cls, init, update, step, refresh, config):
        self = super().__new__(cls, init, update)
        self.step = step
        self.refresh = refresh
        self.config = config
        return self


def _shared_predicate(shared: Any) -> Callable[[str], bool] | None:
    if shared is None:
        return None
    if callable(shared):
        return shared
    if isinstance(shared, str) or not isinstance(shared, Collection):
        raise TypeError(
            "`shared` must be None, a predicate on dotted parameter names or a collection of "
            f"names, got {type(shared).__name__}"
        )
    names = frozenset(shared)
    return lambda name: name in names


def songoku(
    loss_fn: Callable[[Params, Any], Any],
    *,
    num_tasks: int,
    shared: Callable[[str], bool] | Collection[str] | None = None,
    refresh_period: int = 32,
    tau_schedule: TauSchedule | float | None = None,
    ema_beta: float = 0.9,
    ema_mode: Literal["active", "refresh"] = "active",
    min_updates_per_cycle: int = 1,
    gradient_transform: GradientTransform | str | None = None,
    reduction: Literal["sum", "mean"] = "sum",
    graph_rule: Literal["threshold", "quantile", "knn", "signed"] = "threshold",
    graph_quantile: float = 0.3,
    graph_knn_k: int = 3,
    graph_density: float | None = None,
    sketch_dim: int | None = None,
    seed: int = 0,
    eps: float = 1e-12,
    adatask_beta: float = 0.9,
    strategy: Literal["auto", "vmap", "loop"] = "auto",
    per_task_rows: Literal["auto", "all", "active"] = "auto",
    legacy_pointer: bool = False,
    reduce: Callable[[PyTree], PyTree] | None = None,
    donate_state: bool = False,
    guard_grads: bool = True,
) -> SonGokuTransform:
    """Build SON-GOKU for ``loss_fn(params, batch) -> K losses`` (dict / tuple / 1-D tensor).

    Args:
        num_tasks: ``K``.
        shared: which parameters are shared (their gradients enter the EMA, the interference and
            the in-group transform): a predicate on dotted names, a collection of names, or None
            (all parameters). The others (heads) get ``Σ_{k∈S} ∇L_k`` as well.
        refresh_period: ``R ≥ 1``, steps between recolourings.
        tau_schedule: a :class:`~gradfn.schedules.TauSchedule`, a constant τ, or None (the
            reference default: constant 0.25). Evaluated at refresh with ``t`` = completed steps.
        ema_beta: ``β ∈ [0, 1)``.
        ema_mode: ``"active"`` or ``"refresh"`` (module docstring).
        min_updates_per_cycle: ``f_min ≥ 1``; above 1, minimum-coverage duplication (spec §1.5).
        gradient_transform: in-group transform of the active tasks' shared gradients: a callable
            ``(grads, active) -> grads`` on task-stacked shared gradients and the ``(K,)`` mask, or
            ``"pcgrad"`` (PCGrad inside the group, averaged over it), ``"pcgrad_sum"`` (the
            reference's summed PCGrad), ``"inverse_norm"`` / ``"adatask"`` (the reference's
            inverse-gradient-norm weighting, applied to shared and head gradients).
        reduction: ``"sum"`` (paper) or ``"mean"`` over the active group.
        graph_rule, graph_quantile, graph_knn_k, graph_density: conflict-graph rule
            (:func:`gradfn.graph.conflict_adjacency`).
        sketch_dim: ``d_sk``: keep the EMA as a ``(K, d_sk)`` random projection (spec §2.4).
        seed: seed of the sketch and of the PCGrad orders.
        eps: added to the norms in ``−cos`` (the reference's ``eps_cosine``).
        adatask_beta: EMA factor of the inverse-norm weighting.
        strategy: per-task gradient strategy of :mod:`gradfn.autodiff`.
        per_task_rows: ``"all"`` computes per-task gradients for all ``K`` tasks (fixed shapes,
            needed under ``torch.compile``); ``"active"`` only for the tasks that need them (reads
            the group on the host, eager only); ``"auto"``: ``"all"`` while compiling.
        legacy_pointer: reproduce the reference's cycle start at group 1 after each refresh.
        reduce: ``reduce(tree) -> tree`` averaging a pytree across ranks
            (:func:`gradfn.distributed.make_reducer`); None: single process (module docstring).
        donate_state: the caller gives up the state it passes in (as with a donated buffer in
            JAX): eagerly, the EMA rows are then updated in place instead of through a copy of
            the whole ``K × n`` EMA (the returned state shares its storage). Under
            ``torch.compile`` the update stays functional. A skipped step still leaves the EMA
            unchanged. The adapter uses it; keep the default when you hold on to old states.
        guard_grads: zero the returned gradients of a skipped step inside the step
            (tensor-only). ``False`` returns them as computed, for a driver that reads
            ``state.skipped`` on the host and then does not apply them (the adapter does).
    """
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}")
    k = check_int("num_tasks", num_tasks, 1)
    r_period = check_int("refresh_period", refresh_period, 1)
    f_min = check_int("min_updates_per_cycle", min_updates_per_cycle, 1)
    if tau_schedule is None:
        schedule = TauSchedule()
    elif isinstance(tau_schedule, TauSchedule):
        schedule = tau_schedule
    elif isinstance(tau_schedule, (int, float)) and not isinstance(tau_schedule, bool):
        schedule = TauSchedule("constant", tau_target=float(tau_schedule))
    else:
        raise TypeError(
            f"`tau_schedule` must be a TauSchedule, a number or None, got {tau_schedule!r}"
        )
    if not (0.0 <= float(ema_beta) < 1.0):
        raise ValueError(f"`ema_beta` must lie in [0, 1), got {ema_beta}")
    if not (0.0 <= float(adatask_beta) < 1.0):
        raise ValueError(f"`adatask_beta` must lie in [0, 1), got {adatask_beta}")
    if ema_mode not in ("active", "refresh"):
        raise ValueError(f"`ema_mode` must be 'active' or 'refresh', got {ema_mode!r}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"`reduction` must be 'sum' or 'mean', got {reduction!r}")
    if graph_rule not in GRAPH_RULES:
        raise ValueError(f"`graph_rule` must be one of {GRAPH_RULES}, got {graph_rule!r}")
    if isinstance(gradient_transform, str) and gradient_transform not in BUILTIN_TRANSFORMS:
        raise ValueError(
            f"`gradient_transform` must be a callable or one of {BUILTIN_TRANSFORMS}, got "
            f"{gradient_transform!r}"
        )
    if gradient_transform is not None and not (
        isinstance(gradient_transform, str) or callable(gradient_transform)
    ):
        raise TypeError("`gradient_transform` must be a callable, a built-in name or None")
    if sketch_dim is not None:
        check_int("sketch_dim", sketch_dim, 1)
    if per_task_rows not in ("auto", "all", "active"):
        raise ValueError(
            f"`per_task_rows` must be 'auto', 'all' or 'active', got {per_task_rows!r}"
        )
    if eps < 0:
        raise ValueError(f"`eps` must be ≥ 0, got {eps}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"`seed` must be an int, got {seed!r}")
    if strategy not in ("auto", "vmap", "loop"):
        raise ValueError(f"`strategy` must be 'auto', 'vmap' or 'loop', got {strategy!r}")
    if reduce is not None and not callable(reduce):
        raise TypeError(f"`reduce` must be callable or None, got {type(reduce).__name__}")
    # validate the graph options once, on a dummy interference matrix
    conflict_adjacency(
        torch.zeros(2, 2),
        0.0,
        graph_rule,
        quantile=graph_quantile,
        knn_k=graph_knn_k,
        density=graph_density,
    )
    is_shared = _shared_predicate(shared)
    beta = float(ema_beta)
    builtin = gradient_transform if isinstance(gradient_transform, str) else None
    if builtin == "adatask":
        builtin = "inverse_norm"
    hook = gradient_transform if callable(gradient_transform) else None
    always_per_task = ema_mode == "active" or gradient_transform is not None
    # with a sketch and no in-group transform the step's outputs are linear in the per-task rows:
    # averaging the sketches and the summed gradient is cheaper than averaging the rows
    late_reduce = sketch_dim is not None and gradient_transform is None

    def shared_names(params: Params) -> list[str]:
        names = [n for n in params if is_shared is None or is_shared(n)]
        if not names:
            raise ValueError("`shared` selects no parameter of `params`")
        return names

    def ema_like(params: Params) -> PyTree:
        names = shared_names(params)
        dev = params[names[0]].device
        if sketch_dim is not None:
            return torch.zeros(k, sketch_dim, dtype=torch.float32, device=dev)
        return {
            n: torch.zeros((k, *params[n].shape), dtype=_ema_dtype(params[n]), device=dev)
            for n in names
        }

    def observe(shared_grads: PyTree) -> PyTree:
        """What the EMA averages: the shared gradients, or their sketch."""
        if sketch_dim is not None:
            return sketch(shared_grads, sketch_dim, seed)
        return {n: g.to(_ema_dtype(g)) for n, g in shared_grads.items()}

    def init(params: Params) -> SonGokuState:
        if not isinstance(params, Mapping) or not params:
            raise TypeError("`params` must be a non-empty mapping of dotted names to tensors")
        dev = next(iter(params.values())).device
        groups = torch.zeros(k, k, dtype=torch.bool, device=dev)
        groups[0] = True  # until the first refresh: one group with every task
        i64 = dict(dtype=torch.int64, device=dev)
        return SonGokuState(
            step=torch.zeros((), **i64),
            ptr=torch.zeros((), **i64),
            groups=groups,
            num_groups=torch.ones((), **i64),
            ema=ema_like(params),
            ema_count=torch.zeros(k, **i64),
            rho=torch.zeros(k, k, dtype=torch.float32, device=dev),
            adjacency=torch.zeros(k, k, dtype=torch.bool, device=dev),
            tau=torch.full((), float("nan"), dtype=torch.float32, device=dev),
            losses=torch.zeros(k, dtype=torch.float32, device=dev),
            active=torch.zeros(k, dtype=torch.bool, device=dev),
            skipped=torch.zeros((), dtype=torch.bool, device=dev),
            norm_ema=torch.zeros(k, dtype=torch.float32, device=dev),
            refreshes=torch.zeros((), **i64),
            seed=torch.tensor(int(seed), **i64),
        )

    def per_task(
        fn: Callable[[Params, Any], Any], params: Params, batch: Any, rows: Tensor, wrt
    ) -> tuple[Tensor, PyTree, Tensor]:
        """Losses (K,), per-task gradients of the rows ``idx`` and ``idx`` (R,) int64.

        Eagerly (``per_task_rows`` "active"/"auto") only the tasks in ``rows`` are differentiated
        (``R = |rows|``, read on the host); otherwise all ``K`` (``idx = arange(K)``).
        """
        compact = per_task_rows == "active" or (per_task_rows == "auto" and not is_compiling())
        if not compact:
            losses, grads = value_and_per_task_grads(
                fn, params, batch, wrt=wrt, strategy=strategy, num_tasks=k
            )
            return losses, grads, torch.arange(k, device=rows.device)
        idx = torch.nonzero(rows).flatten()
        chosen = idx.tolist()
        captured: dict[str, Tensor] = {}

        def sub(p: Params, b: Any) -> list[Tensor]:
            out = _loss_list(fn(p, b), k)
            captured["losses"] = _stack_losses(out).detach()
            return [out[i] for i in chosen]

        _, grads = value_and_per_task_grads(sub, params, batch, wrt=wrt, strategy=strategy)
        return captured["losses"], grads, idx

    def blend_rows(ema: PyTree, obs: PyTree, idx: Tensor, mask: Tensor) -> PyTree:
        """``e_i ← β e_i + (1−β) o_i`` for the rows ``idx`` where ``mask`` (R,) holds."""
        if donate_state and not is_compiling():
            return blend_rows_inplace(ema, obs, idx, mask)

        def one(e: Tensor, o: Tensor) -> Tensor:
            old = e.index_select(0, idx)
            m = mask.reshape((-1,) + (1,) * (e.dim() - 1))
            new = torch.where(m, beta * old + (1.0 - beta) * o.to(e.dtype), old)
            return e.index_copy(0, idx, new)

        return optree.tree_map(one, ema, obs)

    def blend_rows_inplace(ema: PyTree, obs: PyTree, idx: Tensor, mask: Tensor) -> PyTree:
        """:func:`blend_rows` writing into ``ema`` (eager; reads the row mask on the host)."""
        sel = torch.nonzero(mask).flatten()
        n_sel = int(sel.numel())
        if n_sel == 0:
            return ema
        rows = idx.index_select(0, sel)
        every = n_sel == k and bool((rows == torch.arange(k, device=rows.device)).all())
        for e, o in zip(optree.tree_leaves(ema), optree.tree_leaves(obs), strict=True):
            if every:
                e.lerp_(o.to(e.dtype), 1.0 - beta)
            else:
                new = torch.lerp(
                    e.index_select(0, rows), o.index_select(0, sel).to(e.dtype), 1.0 - beta
                )
                e.index_copy_(0, rows, new)
        return ema

    def scatter_rows(tree: PyTree, idx: Tensor) -> PyTree:
        def one(x: Tensor) -> Tensor:
            out = torch.zeros((k, *x.shape[1:]), dtype=x.dtype, device=x.device)
            return out.index_copy(0, idx, x)

        return optree.tree_map(one, tree)

    def step(
        state: SonGokuState,
        params: Params,
        batch: Any,
        probe: Tensor | None = None,
        *,
        loss_scale: Tensor | None = None,
    ) -> tuple[SonGokuState, dict[str, Tensor]]:
        """One SON-GOKU step without recolouring (tensor-only; compiles with fullgraph=True).

        ``probe`` (K,) bool: tasks whose EMA this step also updates (``ema_mode="refresh"``
        probes every task on the step that triggers a refresh). ``loss_scale``: module docstring.
        """
        fn = scale_losses(loss_fn, loss_scale)
        active = state.groups.index_select(0, state.ptr.reshape(1)).squeeze(0)
        af = active.to(torch.float32)
        count = af.sum()
        red = 1.0 / count if reduction == "mean" else torch.ones_like(count)
        names = shared_names(params)
        name_set = set(names)
        ema_mask = active if ema_mode == "active" else torch.zeros_like(active)
        if probe is not None:
            ema_mask = ema_mask | probe.to(device=active.device, dtype=torch.bool)
        norm_ema = state.norm_ema
        obs = None

        if not always_per_task and probe is None:
            losses, grads = value_and_weighted_grad(fn, params, batch, af * red, num_tasks=k)
            losses, grads = unscale((losses, grads), loss_scale)
            if reduce is not None:
                losses, grads = reduce((losses, grads))
        else:
            losses, rows, idx = per_task(fn, params, batch, active | ema_mask, None)
            losses, rows = unscale((losses, rows), loss_scale)
            if reduce is not None and not late_reduce:
                losses, rows = reduce((losses, rows))
            act_r = active.index_select(0, idx)
            shared_r = {n: rows[n] for n in names}
            other_r = {n: g for n, g in rows.items() if n not in name_set}
            obs = observe(shared_r)
            w_other = af * red
            w_shared = w_other
            if builtin is not None:
                gram_r = _gram(shared_r)
                gram = torch.zeros(k, k, dtype=gram_r.dtype, device=gram_r.device)
                gram = gram.index_put((idx[:, None], idx[None, :]), gram_r)
            if builtin in ("pcgrad", "pcgrad_sum"):
                order = pcgrad_order(state.seed, state.step, k)
                coeffs = pcgrad_coefficients(gram, active, order)
                w_pc = af / count if builtin == "pcgrad" else af
                w_shared = w_pc.to(coeffs.dtype) @ coeffs
            elif builtin == "inverse_norm":
                w_inv, norm_ema = inverse_norm_weights(gram, active, state.norm_ema, adatask_beta)
                w_shared = w_other = w_inv * red.to(w_inv.dtype)
            elif hook is not None:
                masked = optree.tree_map(
                    lambda g: g * act_r.reshape((-1,) + (1,) * (g.dim() - 1)).to(g.dtype),
                    shared_r,
                )
                out = hook(scatter_rows(masked, idx), active)
                shared_r = {n: out[n].index_select(0, idx) for n in names}
            shared_g = weighted_sum(shared_r, w_shared.index_select(0, idx))
            other_g = weighted_sum(other_r, w_other.index_select(0, idx)) if other_r else {}
            grads = {n: (shared_g[n] if n in name_set else other_g[n]) for n in params}
            if reduce is not None and late_reduce:
                # linear in the rows: average the sketches and the sum, not the rows
                losses, obs, grads = reduce((losses, obs, grads))

        losses = losses.to(torch.float32)
        bad = (~torch.isfinite(losses) & active).any() | _nonfinite(grads)
        new_ema, ema_count = state.ema, state.ema_count
        if obs is not None:
            upd_r = ema_mask.index_select(0, idx)
            finite_r = torch.ones_like(upd_r)
            for leaf in optree.tree_leaves(obs):
                finite_r = finite_r & torch.isfinite(leaf.reshape(leaf.shape[0], -1).sum(dim=1))
            bad = bad | (upd_r & ~finite_r).any()
            new_ema = blend_rows(state.ema, obs, idx, upd_r & ~bad)
            ema_count = state.ema_count + (ema_mask & ~bad).to(torch.int64)
        ok = ~bad
        small = state._replace(ema=None)
        moved = small._replace(
            step=state.step + 1,
            ptr=torch.remainder(state.ptr + 1, state.num_groups),
            active=active,
            norm_ema=norm_ema,
        )
        out = tree_where(ok, moved, small)._replace(
            skipped=bad, losses=losses, ema=new_ema, ema_count=ema_count
        )
        if guard_grads:
            zero = torch.zeros((), dtype=losses.dtype, device=losses.device)
            grads = {n: torch.where(ok, g, zero.to(g.dtype)) for n, g in grads.items()}
        return out, grads

    def refresh(
        state: SonGokuState,
        params: Params,
        batch: Any = None,
        probe: Tensor | None = None,
        *,
        loss_scale: Tensor | None = None,
    ) -> SonGokuState:
        """Recolour: (optional EMA update on ``batch``), ``τ(t)``, ``ρ``, graph, colouring.

        ``batch`` holds fresh per-task data for ``loss_fn``; ``probe`` (K,) bool selects the tasks
        whose EMA it updates (default: all). Tasks with a non-finite loss or gradient keep their EMA.
        """
        ema = state.ema
        ema_count = state.ema_count
        if batch is not None:
            mask = (
                torch.ones(k, dtype=torch.bool, device=state.step.device)
                if probe is None
                else probe.to(device=state.step.device, dtype=torch.bool)
            )
            fn = scale_losses(loss_fn, loss_scale)
            losses, rows, idx = per_task(fn, params, batch, mask, is_shared)
            losses, rows = unscale((losses, rows), loss_scale)
            obs = observe({n: rows[n] for n in shared_names(params)})
            if reduce is not None:
                losses, obs = reduce((losses, obs))
            finite = torch.isfinite(losses.to(torch.float32)).index_select(0, idx)
            for leaf in optree.tree_leaves(obs):
                finite = finite & torch.isfinite(leaf.reshape(leaf.shape[0], -1)).all(dim=1)
            upd = mask.index_select(0, idx) & finite
            ema = blend_rows(ema, obs, idx, upd)
            ema_count = ema_count.index_add(0, idx, upd.to(torch.int64))
        tau = tau_value(schedule, state.step).to(torch.float32)
        rho = interference(_gram(ema), eps).to(torch.float32)
        adj, tau_used = conflict_adjacency(
            rho,
            tau,
            graph_rule,
            quantile=graph_quantile,
            knn_k=graph_knn_k,
            density=graph_density,
        )
        groups, num_groups = groups_from_colors(color(adj))
        if f_min > 1:
            groups = duplicate_min_coverage(groups, adj, f_min)
        ptr = (
            torch.remainder(torch.ones_like(num_groups), num_groups)
            if legacy_pointer
            else (torch.zeros_like(num_groups))
        )
        return state._replace(
            ema=ema,
            ema_count=ema_count,
            groups=groups,
            num_groups=num_groups,
            ptr=ptr,
            rho=rho,
            adjacency=adj,
            tau=tau_used.to(torch.float32),
            refreshes=state.refreshes + 1,
        )

    def update(
        state: SonGokuState,
        params: Params,
        batch: Any,
        refresh_batch: Any = None,
        *,
        loss_scale: Tensor | None = None,
    ) -> tuple[SonGokuState, dict[str, Tensor]]:
        """``step``, then ``refresh`` when ``t`` reaches a multiple of ``R`` (eager driver)."""
        due = (int(state.step) + 1) % r_period == 0
        probe = None
        if due and ema_mode == "refresh" and refresh_batch is None:
            probe = torch.ones(k, dtype=torch.bool, device=state.step.device)
        state, grads = step(state, params, batch, probe, loss_scale=loss_scale)
        if due and not bool(state.skipped):
            state = refresh(state, params, refresh_batch, loss_scale=loss_scale)
        return state, grads

    config = dict(
        num_tasks=k,
        refresh_period=r_period,
        tau_schedule=schedule,
        ema_beta=beta,
        ema_mode=ema_mode,
        min_updates_per_cycle=f_min,
        gradient_transform=gradient_transform,
        reduction=reduction,
        graph_rule=graph_rule,
        sketch_dim=sketch_dim,
        seed=int(seed),
        eps=eps,
        one_backward=not always_per_task,
        distributed=reduce is not None,
    )
    return SonGokuTransform(init, update, step, refresh, config)


def _nonfinite(tree: Mapping[str, Tensor]) -> Tensor:
    """0-d bool: does any leaf hold a NaN or an infinity?

    One fused multi-tensor norm over the leaves (``torch._foreach_norm``, as
    ``torch.nn.utils.clip_grad_norm_`` uses): a non-finite entry gives a non-finite norm.
    """
    leaves = list(tree.values())
    if not leaves:
        return torch.zeros((), dtype=torch.bool)
    norms = torch._foreach_norm(leaves)
    return ~torch.isfinite(torch.stack([x.to(torch.float32) for x in norms]).sum())


def _gram(stacked: PyTree) -> Tensor:
    """Gramian in float64 when the gradients are float64, else float32."""
    wide = any(x.dtype == torch.float64 for x in optree.tree_leaves(stacked))
    return gramian(stacked, dtype=torch.float64 if wide else torch.float32)


def _ema_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32
