"""What ``load_state_dict`` checks before it changes anything: a checkpoint from another model
or configuration, or holding non-finite running values, fails at load with a ``ValueError``
naming what differs, not at a later step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import optree
import torch
from torch import Tensor

from gradfn.algorithms import ConductorConfig, ConductorState, SonGokuConfig, SonGokuState

if TYPE_CHECKING:
    from gradfn.adapters._songoku import SonGokuScheduler

__all__ = [
    "check_fingerprint",
    "check_finite",
    "check_songoku_split",
    "conductor_fingerprint",
    "conductor_running_values",
    "songoku_fingerprint",
    "songoku_running_values",
]


def songoku_fingerprint(config: SonGokuConfig) -> dict[str, Any]:
    """The settings that decide what SON-GOKU's saved values mean (the EMA's space and
    normalisation, the aggregator's state); hyper-parameters a resumed run may change (``τ``,
    ``R``, ``β``) are not part of it."""
    agg, lw = config.aggregator, config.loss_weighting
    return {
        "num_tasks": config.num_tasks,
        "ema_mode": config.ema_mode,
        "sketch_dim": config.sketch_dim,
        "seed": config.seed,
        "aggregator": None if agg is None else agg.name,
        "weight_heads": config.weight_heads,
        "reduction": config.reduction,
        "loss_weighting": None if lw is None else lw.name,
    }


def conductor_fingerprint(config: ConductorConfig) -> dict[str, Any]:
    """The settings that decide what GCond's saved values mean (momentum or Lion, the
    accumulation dtype, the winner history's length, the accumulation mode)."""
    return {
        "num_tasks": config.num_tasks,
        "use_lion": config.use_lion,
        "accumulation_dtype": str(config.accumulation_dtype),
        "dominance_window": config.dominance_window,
        "stochastic": config.stochastic,
    }


def check_fingerprint(saved: Any, own: Mapping[str, Any], what: str) -> None:
    """``saved`` (None: a checkpoint from before fingerprints, not checked) must equal ``own``."""
    if saved is None:
        return
    if not isinstance(saved, Mapping):
        raise ValueError(f"load_state_dict: the checkpoint's `config` is not a dict: {saved!r:.80}")
    diff = {k: (saved.get(k), v) for k, v in own.items() if saved.get(k) != v}
    if diff:
        listed = ", ".join(
            f"{k}: checkpoint {a!r}, this {what} {b!r}" for k, (a, b) in diff.items()
        )
        raise ValueError(
            f"load_state_dict: the checkpoint was saved with another configuration ({listed}); "
            f"build the {what} with the checkpoint's settings"
        )


def check_finite(tree: Any, what: str) -> None:
    """Every floating tensor of ``tree`` is finite (else a ValueError naming the entry)."""
    paths, leaves, _ = optree.tree_flatten_with_path(tree)
    for path, leaf in zip(paths, leaves, strict=True):
        if (
            isinstance(leaf, Tensor)
            and leaf.is_floating_point()
            and not bool(torch.isfinite(leaf).all())
        ):
            where = "/".join(str(p) for p in path)
            raise ValueError(
                f"load_state_dict: {what} entry {where} holds a NaN or an infinity (saved after a "
                "corrupted step, or damaged): it would silently break every later step"
            )


def songoku_running_values(state: SonGokuState) -> dict[str, Any]:
    """The values a SON-GOKU step builds on: the EMAs and the aggregator's state (``tau``,
    ``rho`` and the last losses may legitimately be NaN)."""
    return {"ema": state.ema, "aggregator": state.aggregator, "weighting": state.loss_weighting}


def conductor_running_values(state: ConductorState) -> dict[str, Any]:
    """The values a GCond cycle builds on: the norm EMAs, previous gradients, momentum / Lion."""
    res = state.resolution
    return {
        "norm_ema": res.norm_ema,
        "prev": res.prev,
        "prev_sq_norms": res.prev_sq_norms,
        "post": state.inner.inner[1],
    }


def _names(value: Any, what: str, known: Sequence[str]) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"load_state_dict: `{what}` must be a list of parameter names")
    names = list(value)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"load_state_dict: `{what}` names parameters this model does not have as trainable "
            f"parameters: {unknown[:5]} (a checkpoint of another model?)"
        )
    return names


def check_songoku_split(
    sched: SonGokuScheduler, state_dict: Mapping[str, Any]
) -> tuple[Tensor, list[str], list[list[str]]]:
    """The checkpoint's ``(usage, shared, heads)``, checked against this scheduler's model, tasks
    and own shared set (its ``shared_param_filter``'s, or the one its first step found)."""
    known = [n for n, _ in sched._named]
    k, p = len(sched.names), len(known)
    usage = state_dict.get("usage")
    if not isinstance(usage, Tensor) or tuple(usage.shape) != (k, p):
        got = tuple(usage.shape) if isinstance(usage, Tensor) else type(usage).__name__
        raise ValueError(
            f"load_state_dict: `usage` must be a ({k}, {p}) tensor (tasks × trainable parameters "
            f"of this model), got {got} (a checkpoint of another model?)"
        )
    shared = _names(state_dict.get("shared_params"), "shared_params", known)
    heads_raw = state_dict.get("head_params")
    if not isinstance(heads_raw, Sequence) or len(heads_raw) != k:
        raise ValueError(f"load_state_dict: `head_params` must hold {k} lists, one per task")
    heads = [_names(h, f"head_params[{i}]", known) for i, h in enumerate(heads_raw)]
    if sched.shared_param_filter is not None:
        own = [n for n, q in sched._named if sched.shared_param_filter(q)]
    else:
        own = list(sched._shared_names)  # empty before the first step: the checkpoint decides
    if own and set(own) != set(shared):
        raise ValueError(
            "load_state_dict: the checkpoint's shared parameters differ from this scheduler's "
            f"(only in the checkpoint: {sorted(set(shared) - set(own))[:5]}, only here: "
            f"{sorted(set(own) - set(shared))[:5]})"
        )
    return usage.to(torch.bool).cpu().clone(), shared, heads
