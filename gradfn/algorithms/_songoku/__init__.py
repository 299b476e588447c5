"""SON-GOKU (Patapati et al., "Graph Coloring for Multi-Task Learning", arXiv:2509.16959).

Every ``R`` steps the per-task EMAs ``e_k`` of the shared gradients give the interference
``ρ = −cos``, a conflict graph ``E_τ = {(i, j): ρ_ij > τ}`` and a Welsh–Powell colouring. Each
step activates one colour group ``S_t`` and returns ``Σ_{k∈S_t} ∇L_k`` (Eq. 6), or what an
in-group aggregator makes of the group's gradients.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from gradfn._internal.checks import check_callable, check_choice
from gradfn.aggregators import Aggregated, Aggregator, aggregator
from gradfn.algorithms._base import Algorithm
from gradfn.algorithms._songoku._config import SonGokuConfig
from gradfn.algorithms._songoku._driver import refresh, refresh_due, update
from gradfn.algorithms._songoku._state import SonGokuState, group_lists, init_state
from gradfn.algorithms._songoku._step import TaskGrads, active_mask, step, task_grads
from gradfn.algorithms._songoku._streaming import check_streaming, streaming_step
from gradfn.algorithms._songoku._touched import touched_mask
from gradfn.conflict import GraphRule
from gradfn.transforms import EmptyState
from gradfn.tree import weighted_sum
from gradfn.typing import LossFn, PyTree, Reducer

__all__ = [
    "SonGoku",
    "SonGokuConfig",
    "SonGokuState",
    "TaskGrads",
    "active_mask",
    "group_lists",
    "songoku",
    "task_grads",
    "touched_mask",
]

_GRAPH_OPTIONS = {
    "graph_rule": "rule",
    "graph_quantile": "quantile",
    "graph_knn_k": "knn_k",
    "graph_density": "density",
}
_BUILTIN_TRANSFORMS = ("pcgrad", "pcgrad_sum", "inverse_norm", "adatask")


@dataclass(frozen=True)
class SonGoku(Algorithm):
    """SON-GOKU as an algorithm; unpacks as ``init, update = songoku(...)``.

    * ``init(params) -> SonGokuState``
    * ``update(state, params, batch, refresh_batch=None, **driver) -> (state, grads)``: the eager
      driver, a ``step`` every call and a ``refresh`` when ``t`` reaches a multiple of ``R``.
    * ``step(state, params, batch, probe=None) -> (state, grads)``: the per-step path, tensor-only,
      compiles with ``torch.compile(fullgraph=True)``.
    * ``refresh(state, params, batch=None, probe=None) -> state``: the recolouring (tensor-only
      with fixed loop lengths, meant to run eagerly every ``R`` steps).
    * ``refresh_due(state) -> bool``: does the next step trigger a refresh?

    The returned gradients are zero for parameters no active task reaches; such parameters
    must keep ``.grad = None`` (:func:`touched_mask`), or a momentum optimizer moves them.
    """

    step: Callable[..., tuple[SonGokuState, dict[str, Any]]]
    refresh: Callable[..., SonGokuState]
    refresh_due: Callable[[SonGokuState], bool]
    config: SonGokuConfig


def _hook_aggregator(hook: Callable[..., PyTree]) -> Aggregator:
    """A 0.1 in-group hook ``(grads, active) -> grads`` as an aggregator (rows summed)."""

    def update(
        state: EmptyState, grads: PyTree, params: PyTree = None, *, active: Any = None, **extra: Any
    ) -> tuple[EmptyState, Aggregated]:
        rows = hook(grads, active)
        w = active.to(next(iter(rows.values())).dtype)
        return state, Aggregated(weighted_sum(rows, w), w, rows)

    return Aggregator(lambda tasks, device=None: EmptyState(), update, "hook", stateful=False)


def _from_gradient_transform(value: Any, seed: int, adatask_beta: float) -> dict[str, Any]:
    """The 0.1 ``gradient_transform`` option as ``aggregator`` / ``weight_heads`` options."""
    warnings.warn(
        "songoku(gradient_transform=...) is deprecated: pass aggregator= (an "
        "aggregators.Aggregator or a method name); 'pcgrad' is aggregator('pcgrad', "
        "reduction='mean'), 'inverse_norm' is aggregator('inverse_norm') with weight_heads=True",
        DeprecationWarning,
        stacklevel=3,
    )
    if value is None:
        return {}
    if isinstance(value, str):
        if value not in _BUILTIN_TRANSFORMS:
            raise ValueError(
                f"`gradient_transform` must be a callable or one of {_BUILTIN_TRANSFORMS}, got "
                f"{value!r}"
            )
        if value in ("pcgrad", "pcgrad_sum"):
            mean = "mean" if value == "pcgrad" else "sum"
            return {"aggregator": aggregator("pcgrad", seed=seed, reduction=mean)}
        return {"aggregator": aggregator("inverse_norm", beta=adatask_beta), "weight_heads": True}
    if not callable(value):
        raise TypeError("`gradient_transform` must be a callable, a built-in name or None")
    return {"aggregator": _hook_aggregator(value)}


def make_config(options: dict[str, Any]) -> SonGokuConfig:
    """A :class:`SonGokuConfig` from keyword options: its fields, plus the flat ``graph_rule``,
    ``graph_quantile``, ``graph_knn_k``, ``graph_density`` and the 0.1 ``gradient_transform`` /
    ``adatask_beta``. Unknown names raise ``TypeError`` listing the valid ones."""
    options = dict(options)
    graph = {_GRAPH_OPTIONS[k]: options.pop(k) for k in list(options) if k in _GRAPH_OPTIONS}
    if graph:
        if "graph" in options:
            raise TypeError("songoku: give `graph=GraphRule(...)` or the graph_* options, not both")
        options["graph"] = GraphRule(**graph)
    adatask_beta = options.pop("adatask_beta", 0.9)
    if "gradient_transform" in options:
        if "aggregator" in options:
            raise TypeError("songoku: give `aggregator`, not also the 0.1 `gradient_transform`")
        legacy = options.pop("gradient_transform")
        options.update(_from_gradient_transform(legacy, options.get("seed", 0), adatask_beta))
    fields = set(SonGokuConfig.__dataclass_fields__)
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(
            f"songoku: unknown option(s) {unknown}; options are {sorted(fields | set(_GRAPH_OPTIONS))}"
        )
    return SonGokuConfig(**options)


def songoku(
    loss_fn: LossFn,
    config: SonGokuConfig | None = None,
    *,
    reduce: Reducer | None = None,
    donate_state: bool = False,
    rows: str = "rows",
    **options: Any,
) -> SonGoku:
    """Build SON-GOKU for ``loss_fn(params, batch) -> K losses`` (dict / tuple / 1-D tensor).

    Args:
        loss_fn: the ``K`` task losses from one batch.
        config: a :class:`SonGokuConfig`; or give its fields as keyword ``options``
            (``num_tasks=K`` is required then; ``graph_rule``, ``graph_quantile``,
            ``graph_knn_k``, ``graph_density`` build its ``graph``).
        reduce: ``reduce(tree) -> tree`` averaging a pytree across ranks
            (:func:`gradfn.integrations.distributed.make_reducer`): per-task statistics are
            averaged BEFORE any EMA, Gramian, aggregator or skip test, so every rank takes the
            same decisions. None: one process.
        donate_state: the caller gives up the state it passes in (as a donated buffer in JAX):
            eagerly, the EMA rows are updated in place and a skipped step is decided with one host
            read, instead of copying the ``K × n`` EMA; on the CPU the per-task rows go into
            ``K × n`` buffers kept from step to step (no fresh memory to fault in at every step),
            so the returned gradients may be views of them, valid until the next step. Under ``torch.compile`` the update stays
            functional. Keep the default when you hold on to old states or gradients.
        rows: ``"rows"`` (the per-task rows of the active tasks, then their sketch or EMA) or
            ``"streaming"`` (needs ``sketch_dim``, no ``aggregator``; eager only): the sketches
            come from one batched backward leaf by leaf and the update from one backward of the
            group's weighted loss, so the ``K × n`` rows never exist (same groups and update).

    The per-call ``loss_scale=`` (a 0-d tensor, e.g. ``GradScaler.scale(torch.ones(()))``) of
    ``update``, ``step`` and ``refresh`` multiplies the losses before differentiation and divides
    the gradients right after (float32), so every decision and the returned gradient are unscaled.
    """
    check_callable("loss_fn", loss_fn)
    check_callable("reduce", reduce, optional=True)
    if options.pop("guard_grads", None) is not None:
        warnings.warn(
            "songoku(guard_grads=...) is deprecated and ignored: a skipped step returns zeros",
            DeprecationWarning,
            stacklevel=2,
        )
    if config is None:
        config = make_config(options)
    elif options:
        raise TypeError("songoku: give a `config` or keyword options, not both")
    elif not isinstance(config, SonGokuConfig):
        raise TypeError(f"`config` must be a SonGokuConfig, got {type(config).__name__}")
    check_choice("rows", rows, ("rows", "streaming"))
    if rows == "streaming":
        check_streaming(config, "songoku")
    donate = bool(donate_state)
    # donated: the per-task row buffers are kept and reused from step to step (eager CPU)
    workspace: dict[Any, Any] | None = {} if donate else None
    stream = rows == "streaming"
    return SonGoku(
        init=partial(init_state, config),
        update=partial(
            update,
            config,
            loss_fn,
            reduce=reduce,
            donate=donate,
            workspace=workspace,
            streaming=stream,
        ),
        step=partial(
            streaming_step if stream else step,
            config,
            loss_fn,
            reduce=reduce,
            donate=donate,
            workspace=workspace,
        ),
        refresh=partial(refresh, config, loss_fn, reduce=reduce, donate=donate, streaming=stream),
        refresh_due=partial(refresh_due, config),
        config=config,
    )
