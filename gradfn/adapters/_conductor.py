"""``GradientConductor``: GCond for ``nn.Module`` training, with the reference implementation's
constructor, call conventions, ``step(data_provider) -> stats`` and checkpointing. The docs' GCond
guide lists every difference from the reference, one line each.

Call conventions: the reference's (:func:`gradfn.adapters._reference_io.micro_batch_losses`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from gradfn import tree
from gradfn.adapters import _checkpoints
from gradfn.adapters._common import (
    check_amp,
    loss_scale,
    norm_buffers,
    reducer,
    restore_buffers,
    unwrap,
    write_grads,
)
from gradfn.adapters._quarantine import Quarantine
from gradfn.adapters._reference_io import eval_mode, micro_batch_losses, running_stats_mode
from gradfn.algorithms import ConductorConfig, ConductorState, conductor
from gradfn.autodiff import functional_loss
from gradfn.integrations.distributed import check_same_config, sync_outputs

__all__ = ["GradientConductor"]

_DDP_SYNC = ("avg", "broadcast", "none")
_DEFAULT_BN: bool | str = False  # measured: docs, GCond guide, BatchNorm
_STATS = ("final_grad_norm", "step", "proj_iters", "min_cosine_sim", "min_cosine_after", "skipped")


class GradientConductor:
    """GCond for ``nn.Module`` training: the reference's arguments and defaults (``model``,
    ``loss_fns``, ``lambdas``, ``accumulation_steps``, then keyword-only ``projection_max_iters``,
    ``norm_cap``, ``momentum_beta``, ``use_lion``, ``trust_ratio_coef``, ``trust_ratio_clip``,
    ``dominance_window``, ``conflict_thresholds``, ``norm_ema_beta``, ``tie_breaking_weights``,
    ``return_raw_grad``, ``remap_power``, ``use_smooth_logic``, ``stochastic_accumulation``,
    ``ddp_sync``, ``freeze_bn``, ``eps``).

    gradfn options (keyword-only): ``reference=True`` (the reference's defects, for comparisons),
    any :class:`~gradfn.algorithms.ConductorConfig` field (``dominance``, ``accumulation_dtype``,
    ``stability_source``, ``min_cosine``, ``arbitrate_weak``, ``norm_floor``, ``cap_single_loss``,
    ``strategy``; ``None`` keeps the default), ``untouched_grad`` (``"none"``: parameters no loss
    reaches get ``p.grad = None``; ``"zeros"``), ``autocast_dtype``, ``scaler`` (a
    ``torch.amp.GradScaler``, torch ≥ 2.3: ``p.grad`` = output × scale, then call ``scaler.step``
    and ``scaler.update``), ``process_group`` and ``compile`` (compile the resolve + momentum
    half; torch ≥ 2.10, optree ≥ 0.13).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fns: Mapping[str, Callable[..., Tensor]],
        lambdas: Mapping[str, float],
        accumulation_steps: int,
        *,
        ddp_sync: str = "avg",
        freeze_bn: bool | str | None = None,
        reference: bool = False,
        untouched_grad: str | None = None,
        autocast_dtype: torch.dtype | None = None,
        scaler: Any = None,
        process_group: Any = None,
        compile: bool | str = False,
        **options: Any,
    ) -> None:
        self.module, ddp, self.process_group = unwrap(model, process_group)
        if not isinstance(loss_fns, Mapping) or not loss_fns:
            raise (ValueError if isinstance(loss_fns, Mapping) else TypeError)(
                f"`loss_fns` must be a non-empty dict name -> callable, got {loss_fns!r:.60}"
            )
        for name, fn in loss_fns.items():
            if not callable(fn):
                raise TypeError(f"`loss_fns[{name!r}]` must be callable, got {type(fn).__name__}")
        if not isinstance(lambdas, Mapping):
            raise TypeError(f"`lambdas` must be a dict name -> float, got {type(lambdas)}")
        if set(lambdas) != set(loss_fns):
            raise ValueError(
                f"`lambdas` keys {sorted(lambdas)} must equal the `loss_fns` keys {sorted(loss_fns)}"
            )
        if ddp_sync not in _DDP_SYNC:
            raise ValueError(f"`ddp_sync` must be one of {_DDP_SYNC}, got {ddp_sync!r}")
        untouched = untouched_grad or ("zeros" if reference else "none")
        if untouched not in ("none", "zeros"):
            raise ValueError(f"`untouched_grad` must be 'none' or 'zeros', got {untouched_grad!r}")
        if ddp_sync == "broadcast":
            warnings.warn(
                "ddp_sync='broadcast' reproduces the reference: each rank resolves its own "
                "gradients and the outputs are SUMMED across ranks (not averaged); "
                "ddp_sync='avg' takes every decision from averaged statistics",
                UserWarning,
                stacklevel=2,
            )
        self.scaler = check_amp(autocast_dtype, scaler, "GradientConductor")
        if freeze_bn is None:
            freeze_bn = True if reference else _DEFAULT_BN
        if not isinstance(freeze_bn, bool) and freeze_bn != "running":
            raise ValueError(f"`freeze_bn` must be True, False or 'running', got {freeze_bn!r}")
        self.model, self.ddp_sync, self.freeze_bn = model, ddp_sync, freeze_bn
        self.reference, self.untouched_grad = bool(reference), untouched
        self.autocast_dtype = (
            torch.bfloat16 if autocast_dtype is None and reference else autocast_dtype
        )
        self.loss_names = list(loss_fns)
        self.loss_fns = dict(loss_fns)
        self.lambdas = {k: lambdas[k] for k in self.loss_names}
        self.accumulation_steps = accumulation_steps
        config = ConductorConfig.from_reference(
            [self.lambdas[k] for k in self.loss_names],
            accumulation_steps,
            reference=reference,
            **options,
        )
        check_same_config(
            {"loss_names": self.loss_names, "ddp_sync": ddp_sync, "reference": reference}
            | {f.name: getattr(config, f.name) for f in dataclasses.fields(config)},
            group=self.process_group,
            what="GradientConductor",
        )
        # "avg": the A_k averaged before every decision; the reference's per-rank scheme (with
        # reference=True, or "broadcast") combines the resolved outputs instead
        per_rank = ddp_sync == "broadcast" or (ddp_sync == "avg" and reference)
        combine = "sum" if ddp_sync == "broadcast" else "mean"
        # a function of the settings, not a bound method: no reference cycle through `self`, so a
        # conductor (and the process group its model holds) is freed as soon as it is dropped
        losses = partial(
            micro_batch_losses,
            self.loss_fns,
            self.loss_names,
            self.autocast_dtype,
            self.reference,
        )
        self._params, loss_fn = functional_loss(self.module, losses)
        self._device = next(iter(self._params.values())).device
        self._named = [(n, p) for n, p in self.module.named_parameters() if n in self._params]
        self._leaf_names = [path[0] for path in tree.tree_paths(self._params)]
        self._algo = conductor(
            loss_fn,
            config=config,
            reduce=reducer(ddp, self.process_group)
            if ddp_sync == "avg" and not reference
            else None,
            sync_outputs=partial(sync_outputs, group=self.process_group, combine=combine)
            if per_rank
            else None,
            compile=compile,
            donate_state=True,
        )
        self._state: ConductorState = self._algo.init(self._params)
        self._stall = Quarantine(self.loss_names, None, "cycle")  # warns when every cycle skips

    def step(self, data_provider: Callable[[], tuple[Any, Any]]) -> dict[str, float | int | bool]:
        """One optimizer step's worth of accumulation and resolution; writes ``p.grad``.

        ``data_provider()`` returns the next ``(x, y)``; it is called ``accumulation_steps`` times.
        Returns ``final_grad_norm``, ``step``, ``proj_iters``, ``min_cosine_sim``,
        ``raw_norm/<k>``, ``norm_ema/<k>`` (two losses or more), ``loss/<k>`` (the reference's
        stats) plus
        ``min_cosine_after`` and ``skipped``.
        """
        if not callable(data_provider):
            raise TypeError(
                f"`data_provider` must be a callable returning (x, y), got {type(data_provider)}"
            )
        scale = loss_scale(self.scaler, self._device)
        mode: contextlib.AbstractContextManager[None]
        if self.freeze_bn == "running":
            mode = running_stats_mode(self.module)
        elif self.freeze_bn:
            mode = eval_mode(self.module, self.reference)
        else:
            mode = contextlib.nullcontext()
        stats_before = norm_buffers(self.module)  # restored when the cycle is skipped
        with mode:
            self._state, grads = self._algo.update(
                self._state, self._params, data_provider, loss_scale=scale
            )
        st = self._state
        values = torch.cat(
            [
                torch.stack([getattr(st, f).float() for f in _STATS]),
                st.raw_norms,
                st.norm_ema,
                st.losses,
            ]
        ).tolist()
        stats: dict[str, float | int | bool] = dict(zip(_STATS, values, strict=False))
        stats["step"], stats["proj_iters"] = int(stats["step"]), int(stats["proj_iters"])
        stats["skipped"] = bool(stats["skipped"])
        k = len(self.loss_names)
        for i, name in enumerate(self.loss_names):
            base = len(_STATS) + i
            stats[f"raw_norm/{name}"] = values[base]
            if k > 1:  # one loss: no arbitration, no norm EMA (the reference reports none)
                stats[f"norm_ema/{name}"] = values[base + k]
            stats[f"loss/{name}"] = values[base + 2 * k]
        skipped = bool(stats["skipped"])
        self._stall.observe(range(k), [stats[f"loss/{n}"] for n in self.loss_names], skipped)
        if skipped:
            restore_buffers(stats_before)
        touched = dict(zip(self._leaf_names, st.touched.tolist(), strict=True))
        write = [touched[n] or self.untouched_grad == "zeros" for n, _ in self._named]
        if skipped and scale is None:  # nothing to apply: optimizer.step() leaves the parameters
            write = [False] * len(self._named)
        write_grads(self._named, grads, write, scale=scale, poison=skipped)
        return stats

    def backward(
        self, data_provider: Callable[[], tuple[Any, Any]]
    ) -> dict[str, float | int | bool]:
        """:meth:`step` under the name :class:`SonGokuScheduler` uses for its grad-only call:
        both only write ``p.grad``; zero_grad, clipping and the optimizer step are the caller's."""
        return self.step(data_provider)

    @property
    def state(self) -> ConductorState:
        """The functional state (a NamedTuple of tensors)."""
        return self._state

    def state_dict(self) -> dict[str, Any]:
        """A copy of the conductor's state (plain containers of tensors, loadable with
        ``torch.load(weights_only=True)``)."""
        return _checkpoints.conductor_state_dict(self)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (also one saved by gradfn 0.1)."""
        _checkpoints.conductor_load_state_dict(self, state_dict)
