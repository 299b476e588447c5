"""What the algorithms decided, as flat ``{key: float}`` dicts for any logger.

One function per state: :func:`songoku_metrics` (:class:`~gradfn.algorithms.SonGokuState`),
:func:`conductor_metrics` (:class:`~gradfn.algorithms.ConductorState`) and
:func:`aggregated_metrics` (:class:`~gradfn.aggregators.Aggregated`). Each works on a state from
the functional API or on an adapter's ``.state``, and returns a new ``dict[str, float]`` to hand
to Lightning's ``self.log_dict``, TensorBoard's ``add_scalars`` or ``wandb.log``.

* Keys: ``<prefix><quantity>`` for a scalar, ``<prefix><quantity>/<task>`` for a per-task value;
  ``<task>`` is the task's name from ``task_names`` or its index (``"0"``, ``"1"``, …). The
  quantities are listed in each function's docstring and in the docs' Logging page; they keep the
  names of ``GradientConductor.step``'s stats and of ``SonGokuScheduler.debug_state()`` where the
  quantity is the same.
* Values: every value is a Python ``float`` (counts and flags too: ``skipped`` is ``0.0`` or
  ``1.0``). Non-finite values are reported as they are (a NaN loss of a skipped step stays NaN;
  SON-GOKU's ``tau`` is NaN before the first refresh): filter them in the logger if it rejects
  them.
* One host read per call: the values are gathered into one float64 tensor on the state's device
  and read with a single ``.tolist()`` (no per-value ``.item()``), so logging every step costs one
  device synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gradfn import tree
from gradfn.aggregators import Aggregated, InverseNormState

if TYPE_CHECKING:
    from gradfn.algorithms import ConductorState, SonGokuState

# ``gradfn.algorithms`` is imported when called: the algorithms import ``gradfn.integrations.amp``,
# so importing them here, when ``gradfn.integrations`` loads, would be circular.

__all__ = ["aggregated_metrics", "conductor_metrics", "songoku_metrics"]


def _check_prefix(prefix: Any) -> str:
    if not isinstance(prefix, str):
        raise TypeError(f"`prefix` must be a str, got {type(prefix).__name__}")
    return prefix


def _task_names(task_names: Any, k: int) -> list[str]:
    """``task_names`` checked against ``K`` tasks, or the indices as strings."""
    if task_names is None:
        return [str(i) for i in range(k)]
    if isinstance(task_names, (str, bytes)) or not isinstance(task_names, Sequence):
        raise TypeError(
            f"`task_names` must be a sequence of str (one per task), got {type(task_names).__name__}"
        )
    names = list(task_names)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"`task_names` must hold str, got {type(bad[0]).__name__} ({bad[0]!r})")
    if len(names) != k:
        raise ValueError(f"`task_names` has {len(names)} names for {k} tasks")
    if len(set(names)) != len(names):
        raise ValueError(f"`task_names` has duplicates: {names}")
    return names


class _Gather:
    """Named scalars and per-task vectors, read with one ``.tolist()``."""

    def __init__(self, prefix: str, names: list[str], device: torch.device) -> None:
        self.prefix, self.names, self.device = prefix, names, device
        self.keys: list[str] = []
        self.parts: list[Tensor] = []

    def scalar(self, key: str, value: Tensor) -> None:
        self.keys.append(self.prefix + key)
        self.parts.append(value.detach().reshape(1).to(self.device, torch.float64))

    def per_task(self, key: str, values: Tensor) -> None:
        values = values.detach().reshape(-1)
        if values.numel() != len(self.names):
            raise ValueError(
                f"`{key}` has {values.numel()} values for {len(self.names)} tasks (malformed state)"
            )
        self.keys.extend(f"{self.prefix}{key}/{n}" for n in self.names)
        self.parts.append(values.to(self.device, torch.float64))

    def read(self) -> dict[str, float]:
        values = torch.cat(self.parts).tolist()  # the one host read
        return dict(zip(self.keys, values, strict=True))


def _row_sq_norms(stacked: Any, k: int, device: torch.device) -> Tensor:
    """``(K,)`` float64 squared norms of the rows of a task-stacked pytree (or ``(K, d)`` tensor)."""
    sq = torch.zeros(k, dtype=torch.float64, device=device)
    for leaf in tree.leaves(stacked):
        sq = sq + leaf.detach().reshape(k, -1).to(device, torch.float64).pow(2).sum(dim=1)
    return sq


def songoku_metrics(
    state: SonGokuState,
    task_names: Sequence[str] | None = None,
    prefix: str = "songoku/",
) -> dict[str, float]:
    """SON-GOKU's decisions and measurements, as ``{key: float}`` (one host read).

    Args:
        state: a :class:`~gradfn.algorithms.SonGokuState` (from ``update`` or
            ``SonGokuScheduler.state`` after the first step).
        task_names: the ``K`` task names for the per-task keys (``SonGokuScheduler.names``);
            None: the indices ``"0"``, ``"1"``, ….
        prefix: prepended to every key.

    Keys (after ``prefix``; ``<task>`` for each task):

    * ``step``: completed steps (``debug_state()``'s ``t``; skipped steps do not count).
    * ``group_index``: the group that runs at the next step (``step_in_cycle``).
    * ``num_groups``: groups (colours) in the cycle (``schedule_len``).
    * ``refreshes``: refreshes of the conflict graph so far.
    * ``skipped``: 1.0 if the last step was skipped (non-finite loss or gradient), else 0.0.
    * ``tau``: the threshold τ used at the last refresh (``last_tau_value``; NaN before it).
    * ``conflict_edges``: edges of the conflict graph at the last refresh.
    * ``max_interference``: the largest interference ``ρ_ij = −cos`` between two tasks at the last
      refresh (an edge is ``ρ > τ``); ``min_cosine``: ``−max_interference``. NaN before the first
      refresh and with one task.
    * ``num_active``: tasks in the last step's group.
    * ``loss/<task>``: the last step's losses (recorded even when it was skipped).
    * ``active/<task>``: 1.0 if the task was in the last step's group.
    * ``ema_norm/<task>``: ``‖e_k‖`` of the gradient EMA (``debug_state()``'s ``ema_norms``; of
      the sketch with a sketch).
    * ``ema_count/<task>``: EMA updates the task received.
    * ``aggregator_norm_ema/<task>``: with the ``inverse_norm`` aggregator, its norm EMA.

    Raises:
        TypeError: ``state`` is not a ``SonGokuState`` (e.g. ``None``: an adapter before its first
            step), ``task_names`` is not a sequence of str, ``prefix`` is not a str.
        ValueError: ``task_names`` does not hold ``K`` distinct names.
    """
    from gradfn.algorithms import SonGokuState

    if not isinstance(state, SonGokuState):
        raise TypeError(f"`state` must be a SonGokuState, got {type(state).__name__}")
    prefix = _check_prefix(prefix)
    k = state.losses.shape[0]
    names = _task_names(task_names, k)
    dev = state.losses.device
    out = _Gather(prefix, names, dev)
    refreshed = state.refreshes > 0
    if k > 1:
        off = ~torch.eye(k, dtype=torch.bool, device=state.rho.device)
        worst = state.rho[off].amax().to(torch.float64)
        worst = torch.where(refreshed, worst, torch.full_like(worst, float("nan")))
    else:
        worst = torch.full((), float("nan"), dtype=torch.float64, device=dev)
    out.scalar("step", state.step)
    out.scalar("group_index", state.group_index)
    out.scalar("num_groups", state.num_groups)
    out.scalar("refreshes", state.refreshes)
    out.scalar("skipped", state.skipped)
    out.scalar("tau", state.tau)
    out.scalar("conflict_edges", torch.triu(state.adjacency, diagonal=1).sum())
    out.scalar("max_interference", worst)
    out.scalar("min_cosine", -worst)
    out.scalar("num_active", state.active.sum())
    out.per_task("loss", state.losses)
    out.per_task("active", state.active)
    out.per_task("ema_norm", _row_sq_norms(state.ema, k, dev).sqrt())
    out.per_task("ema_count", state.ema_count)
    if isinstance(state.aggregator, InverseNormState):
        out.per_task("aggregator_norm_ema", state.aggregator.norm_ema)
    return out.read()


def conductor_metrics(
    state: ConductorState,
    task_names: Sequence[str] | None = None,
    prefix: str = "gcond/",
) -> dict[str, float]:
    """GradientConductor's decisions and measurements, as ``{key: float}`` (one host read).

    With ``prefix=""`` and the adapter's ``loss_names``, the keys and values of
    ``GradientConductor.step``'s stats are a subset of these (as floats).

    Args:
        state: a :class:`~gradfn.algorithms.ConductorState` (from ``update`` / ``process``, or
            ``GradientConductor.state``).
        task_names: the ``K`` loss names for the per-loss keys (``GradientConductor.loss_names``);
            None: the indices ``"0"``, ``"1"``, ….
        prefix: prepended to every key.

    Keys (after ``prefix``; ``<task>`` for each loss):

    * ``final_grad_norm``: norm of the gradient returned by the last cycle (0 when skipped).
    * ``step``: momentum updates (applied cycles).
    * ``proj_iters``: projection iterations of the last applied cycle.
    * ``min_cosine_sim`` / ``min_cosine_after``: the smallest cosine between two losses' gradients
      before / after the resolution, in the last applied cycle.
    * ``skipped``: 1.0 if the last cycle was skipped (non-finite), else 0.0; ``num_skipped``:
      skipped cycles so far.
    * ``loss/<task>``: λ-weighted mean losses of the last cycle; ``raw_loss/<task>``: unweighted.
    * ``raw_norm/<task>``: ``‖A_k‖`` before the cap.
    * ``norm_ema/<task>``: the norm EMAs (two losses or more, as in the adapter's stats: one loss
      is never arbitrated).

    Raises:
        TypeError: ``state`` is not a ``ConductorState``, ``task_names`` is not a sequence of
            str, ``prefix`` is not a str.
        ValueError: ``task_names`` does not hold ``K`` distinct names.
    """
    from gradfn.algorithms import ConductorState

    if not isinstance(state, ConductorState):
        raise TypeError(f"`state` must be a ConductorState, got {type(state).__name__}")
    prefix = _check_prefix(prefix)
    k = state.losses.shape[0]
    names = _task_names(task_names, k)
    out = _Gather(prefix, names, state.losses.device)
    out.scalar("final_grad_norm", state.final_grad_norm)
    out.scalar("step", state.step)
    out.scalar("proj_iters", state.proj_iters)
    out.scalar("min_cosine_sim", state.min_cosine_sim)
    out.scalar("min_cosine_after", state.min_cosine_after)
    out.scalar("skipped", state.skipped)
    out.scalar("num_skipped", state.num_skipped)
    out.per_task("loss", state.losses)
    out.per_task("raw_loss", state.raw_losses)
    out.per_task("raw_norm", state.raw_norms)
    if k > 1:
        out.per_task("norm_ema", state.norm_ema)
    return out.read()


def aggregated_metrics(
    aggregated: Aggregated,
    task_names: Sequence[str] | None = None,
    prefix: str = "aggregator/",
) -> dict[str, float]:
    """An aggregator's output, as ``{key: float}`` (one host read).

    Args:
        aggregated: the :class:`~gradfn.aggregators.Aggregated` an aggregator's ``update``
            returned.
        task_names: the ``K`` task names; None: the indices ``"0"``, ``"1"``, ….
        prefix: prepended to every key.

    Keys (after ``prefix``): ``grad_norm`` (norm of the aggregated gradient over all its
    leaves, accumulated in float64) and ``weight/<task>`` (the weights ``w_k``; for GradDrop,
    which is not a weighting, the weights it reports).

    Raises:
        TypeError: ``aggregated`` is not an ``Aggregated``, ``task_names`` is not a sequence of
            str, ``prefix`` is not a str.
        ValueError: the weights are not 1-D, or ``task_names`` does not hold ``K`` distinct names.
    """
    if not isinstance(aggregated, Aggregated):
        raise TypeError(f"`aggregated` must be an Aggregated, got {type(aggregated).__name__}")
    prefix = _check_prefix(prefix)
    w = aggregated.weights
    if not isinstance(w, Tensor) or w.dim() != 1:
        raise ValueError("`aggregated.weights` must be a 1-D tensor of K weights")
    names = _task_names(task_names, w.shape[0])
    out = _Gather(prefix, names, w.device)
    sq = [g.detach().to(w.device, torch.float64).pow(2).sum() for g in tree.leaves(aggregated.grad)]
    norm = torch.stack(sq).sum().sqrt() if sq else torch.zeros((), device=w.device)
    out.scalar("grad_norm", norm)
    out.per_task("weight", w)
    return out.read()
