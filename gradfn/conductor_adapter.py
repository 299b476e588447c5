"""``GradientConductor``: the reference's class interface over :func:`gradfn.conductor.conductor`.

Drop-in for the reference's ``GradientConductor`` (gcond spec §1): the same constructor arguments
and defaults, the same call conventions, ``step(data_provider) -> stats``, ``state_dict()`` /
``load_state_dict()``. The algorithm lives in :mod:`gradfn.conductor`; this class only turns the
module and loss callables into a pure ``loss_fn(params, batch)``, holds ``(params, state)`` and
writes ``p.grad``.

Call conventions (reference, HEAD): ``data_provider()`` returns ``(x, y)`` (already on the device).
If ``x`` is a dict with ``'args'`` / ``'kwargs'``: ``model(*x['args'], **x['kwargs'])``; a tuple /
list: ``model(*x)``; else ``model(x)``. If ``y`` is a dict with ``'args'`` / ``'kwargs'``:
``loss_fn(out, *y['args'], **y['kwargs'])``; else ``loss_fn(out, y)``.

Differences from the reference (each a defect of spec §5; ``reference=True`` restores them all):

* classic mode runs ONE forward per micro-batch for all losses (the reference: one per loss);
* float32 accumulation / momentum, raw previous gradients for stability, the true minimum cosine,
  no weak-zone history, a norm (not squared-norm) floor, the cap with one loss (see
  :mod:`gradfn.conductor`);
* ``freeze_bn=True`` puts only the BatchNorm layers in eval mode during accumulation (normalise with
  the running statistics, leave them unchanged); Dropout keeps its mode. The reference puts the whole
  model in eval mode;
* parameters that no loss touches get ``p.grad = None`` (``untouched_grad="zeros"``: zeros, as the
  reference). They are found once, on the first step, by one extra forward + backward of the first
  micro-batch (random state and BatchNorm statistics restored);
* a non-finite loss or gradient skips the cycle: the conductor's state is unchanged, every
  ``p.grad`` is set to ``None`` (so ``optimizer.step()`` leaves the parameters alone; with a
  ``scaler``: ``+inf``, see below) and ``stats["skipped"]`` is True;
* no autocast unless ``autocast_dtype`` is given (the reference forces bfloat16 autocast on CUDA);
* ``state_dict()`` returns copies (the reference: live references) and records the loss names,
  which ``load_state_dict`` checks;
* distributed: every rank takes the same decisions from averaged statistics (below), where the
  reference resolves per rank and sums the outputs.

Distributed training (``torch.distributed``, gloo or NCCL), by ``ddp_sync``:

* ``"avg"`` (default): when the model is wrapped in ``DistributedDataParallel`` (unwrapped: the
  forward runs through ``model.module`` with substituted parameters, so DDP's hooks never fire) or
  a process group is initialised before the conductor is built, each rank's accumulated per-loss
  gradients ``A_k`` and losses are averaged across ranks (``K·n + 2K`` floats per cycle, float32,
  bucketed) BEFORE the Gramian, the EMAs, the resolution and the arbitrator
  (:func:`gradfn.conductor.conductor`'s ``reduce``). Every rank then holds the same state and
  writes the same gradient; nothing else is communicated. With ``reference=True``: the
  reference's scheme instead, each rank resolves its local ``A_k`` and the written outputs are
  averaged (``n`` floats per cycle).
* ``"broadcast"``: the reference's scheme, per-rank resolution and the outputs SUMMED across ranks
  (the reference's behaviour despite the name; a warning says so at construction).
* ``"none"``: no communication, every rank on its own gradients.

``process_group`` selects the group (default: the DDP model's, else the default group). In the
per-rank schemes a cycle skipped on one rank is skipped on all. Buffers (BatchNorm statistics)
are not synchronised.

Mixed precision: ``autocast_dtype`` (``torch.bfloat16``, or ``torch.float16`` on GPU) runs the
forward and the losses under ``torch.autocast``. ``scaler`` (a ``torch.amp.GradScaler``): the
losses are scaled before differentiation, the accumulated gradients unscaled (float32) before any
statistic or decision, and ``p.grad`` receives the GCond output times the scale; YOU then call
``scaler.step(optimizer)`` (which unscales it exactly once: the output is never unscaled twice,
gcond spec §2.12) and ``scaler.update()``. A non-finite cycle leaves the state unchanged and writes
``+inf`` gradients, so ``scaler.step`` skips the optimizer step and ``scaler.update`` lowers the
scale, as after a plain overflowing ``scaler.scale(loss).backward()``. ``stats`` are unscaled.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import optree
import torch
from torch import Tensor, nn

from gradfn.amp import poison_like
from gradfn.autodiff import functional_loss
from gradfn.conductor import ConductorState, conductor, discard_cycle, reference_options
from gradfn.distributed import all_reduce_mean, is_distributed, make_reducer, world_size

__all__ = ["GradientConductor"]

_DDP_SYNC = ("avg", "broadcast", "none")


def _call_model(model: nn.Module, x: Any) -> Any:
    if isinstance(x, Mapping) and ("args" in x or "kwargs" in x):
        return model(*x.get("args", ()), **x.get("kwargs", {}))
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def _call_loss(loss_fn: Callable, out: Any, y: Any) -> Tensor:
    if isinstance(y, Mapping) and ("args" in y or "kwargs" in y):
        return loss_fn(out, *y.get("args", ()), **y.get("kwargs", {}))
    return loss_fn(out, y)


def _unwrap(model: nn.Module) -> nn.Module:
    parallel = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, parallel) else model


@contextlib.contextmanager
def _batchnorm_eval(module: nn.Module, whole_model: bool) -> Iterator[None]:
    """BatchNorm layers (or, ``whole_model``, every module) in eval mode; modes restored after."""
    targets = [
        m for m in module.modules() if whole_model or isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    modes = [m.training for m in targets]
    try:
        for m in targets:
            m.training = False
        yield
    finally:
        for m, mode in zip(targets, modes, strict=True):
            m.training = mode


def _state_items(state: ConductorState) -> tuple[list[str], list[Tensor]]:
    """The state's tensors with '/'-joined paths as keys (``momentum/1/<param>``, ``history``)."""
    paths, leaves, _ = optree.tree_flatten_with_path(state._asdict())
    return ["/".join(str(p) for p in path) for path in paths], leaves


class GradientConductor:
    """GCond for ``nn.Module`` training: the reference's constructor, ``step`` and checkpointing.

    Args (spec §1; defaults as the reference's code):
        model: the ``nn.Module`` (or DDP / DataParallel wrapper); its trainable parameters
            (``requires_grad=True`` at construction) receive the gradients.
        loss_fns: ``{name: loss_fn(model_output, target, ...) -> scalar}``, non-empty.
        lambdas: ``{name: weight}`` with exactly the keys of ``loss_fns``.
        accumulation_steps: micro-batches per step (``N``; the spec's ``K``).
        projection_max_iters: resolution iterations; ``None`` or ``0`` → ``2·#losses``.
        norm_cap: per-loss L2 clip of the accumulated gradients (``None``: off).
        momentum_beta: in [0, 1). use_lion, trust_ratio_coef (> 0), trust_ratio_clip: spec §2.8.
        dominance_window: >= 0 (0 disables the rotation).
        conflict_thresholds: ``(critical, main, weak)`` in [-1, 1], non-decreasing.
        norm_ema_beta: in [0, 1). tie_breaking_weights: ``(stability, strength)``, >= 0.
        return_raw_grad: write the resolved sum instead of the momentum update.
        remap_power: > 0. use_smooth_logic: smooth rule (True) or three zones.
        stochastic_accumulation: each loss on its own ``N/#losses`` micro-batches (``N`` must be
            divisible by the number of losses, checked here).
        ddp_sync: ``"avg"`` | ``"broadcast"`` | ``"none"`` (module docstring).
        process_group: the ``torch.distributed`` group (default: the DDP model's, else the
            default group).
        freeze_bn: BatchNorm layers in eval mode during accumulation.
        eps: numerical floor.

    gradfn options (keyword-only; ``None`` = the gradfn default, or the reference's with
    ``reference=True``): ``dominance`` (``"loses"`` | ``"wins"``), ``untouched_grad``
    (``"none"`` | ``"zeros"``), ``accumulation_dtype``, ``stability_source``, ``min_cosine``,
    ``arbitrate_weak``, ``norm_floor``, ``cap_single_loss``, ``autocast_dtype``; ``scaler`` (a
    ``torch.amp.GradScaler``: module docstring); ``strategy`` (per-task gradient strategy of the
    classic mode) and ``compile`` (compile the resolve + momentum part).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fns: Mapping[str, Callable[..., Tensor]],
        lambdas: Mapping[str, float],
        accumulation_steps: int,
        *,
        projection_max_iters: int | None = None,
        norm_cap: float | None = None,
        momentum_beta: float = 0.85,
        use_lion: bool = False,
        trust_ratio_coef: float = 1e-4,
        trust_ratio_clip: float = 100.0,
        dominance_window: int = 3,
        conflict_thresholds: tuple[float, float, float] = (-0.8, -0.5, 0.0),
        norm_ema_beta: float = 0.95,
        tie_breaking_weights: tuple[float, float] = (0.8, 0.2),
        return_raw_grad: bool = False,
        remap_power: float = 2.0,
        use_smooth_logic: bool = True,
        stochastic_accumulation: bool = True,
        ddp_sync: str = "avg",
        freeze_bn: bool = True,
        eps: float = 1e-8,
        reference: bool = False,
        dominance: str = "loses",
        untouched_grad: str | None = None,
        accumulation_dtype: torch.dtype | None = None,
        stability_source: str | None = None,
        min_cosine: str | None = None,
        arbitrate_weak: bool | None = None,
        norm_floor: float | None = None,
        cap_single_loss: bool | None = None,
        autocast_dtype: torch.dtype | None = None,
        scaler: Any = None,
        process_group: Any = None,
        strategy: str = "auto",
        compile: bool | str = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
        if not isinstance(loss_fns, Mapping):
            raise TypeError(f"`loss_fns` must be a dict name -> callable, got {type(loss_fns)}")
        if len(loss_fns) == 0:
            raise ValueError("`loss_fns` is empty: give at least one loss")
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
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(
                "`autocast_dtype` must be None, torch.bfloat16 or torch.float16, got "
                f"{autocast_dtype!r}"
            )
        if scaler is not None and not all(
            hasattr(scaler, a) for a in ("scale", "step", "update", "is_enabled")
        ):
            raise TypeError("`scaler` must be a torch.amp.GradScaler or None")
        if ddp_sync == "broadcast":
            warnings.warn(
                "ddp_sync='broadcast' reproduces the reference: each rank resolves its own "
                "gradients and the outputs are SUMMED across ranks (not averaged); "
                "ddp_sync='avg' takes every decision from averaged statistics",
                UserWarning,
                stacklevel=2,
            )
        untouched = untouched_grad or ("zeros" if reference else "none")
        if untouched not in ("none", "zeros"):
            raise ValueError(f"`untouched_grad` must be 'none' or 'zeros', got {untouched_grad!r}")

        self.model = model
        self.module = _unwrap(model)
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        if process_group is None and ddp:
            process_group = model.process_group
        self.process_group = process_group
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.loss_names = list(loss_fns)
        self.loss_fns = dict(loss_fns)
        self.lambdas = {k: lambdas[k] for k in self.loss_names}
        self.accumulation_steps = accumulation_steps
        self.ddp_sync = ddp_sync
        # "avg": A_k averaged before every decision (the reference's per-rank scheme with
        # reference=True); the output sync of the per-rank schemes runs after each step
        averaged = ddp_sync == "avg" and not reference
        reduce = (
            make_reducer(process_group)
            if averaged and (ddp or is_distributed(process_group))
            else None
        )
        self._output_sync = ddp_sync == "broadcast" or (ddp_sync == "avg" and not averaged)
        self.freeze_bn = bool(freeze_bn)
        self.reference = bool(reference)
        self.untouched_grad = untouched
        if autocast_dtype is None and reference:
            autocast_dtype = torch.bfloat16  # the reference: bf16 autocast, CUDA only
        self.autocast_dtype = autocast_dtype

        defaults = reference_options(eps) if reference else {}
        extras = {
            "accumulation_dtype": accumulation_dtype,
            "stability_source": stability_source,
            "min_cosine": min_cosine,
            "arbitrate_weak": arbitrate_weak,
            "norm_floor": norm_floor,
            "cap_single_loss": cap_single_loss,
        }
        extras = {k: v if v is not None else defaults.get(k) for k, v in extras.items()}
        extras = {k: v for k, v in extras.items() if v is not None}

        self._params, self._loss_fn = functional_loss(self.module, self._losses)
        self._device = next(iter(self._params.values())).device
        self._transform = conductor(
            self._loss_fn,
            [self.lambdas[k] for k in self.loss_names],
            accumulation_steps=accumulation_steps,
            stochastic=stochastic_accumulation,
            thresholds=conflict_thresholds,
            rule="smooth" if use_smooth_logic else "zones",
            max_iters=projection_max_iters or None,
            remap_power=remap_power,
            norm_cap=norm_cap,
            norm_ema_beta=norm_ema_beta,
            momentum_beta=momentum_beta,
            use_lion=use_lion,
            trust_ratio_coef=trust_ratio_coef,
            trust_ratio_clip=trust_ratio_clip,
            dominance_window=dominance_window,
            dominance=dominance,
            tie_breaking_weights=tie_breaking_weights,
            return_raw_grad=return_raw_grad,
            eps=eps,
            strategy=strategy,
            compile=compile,
            skip_guard=False,  # a skipped cycle is discarded below, at no cost (stats sync anyway)
            reduce=reduce,
            **extras,
        )
        self._state = self._transform.init(self._params)
        self._untouched: set[str] | None = None if untouched == "none" else set()

    # -----------------------------------------------------------------------------------------
    # the pure loss function seen by the core

    def _losses(self, module: nn.Module, batch: tuple[Any, Any]) -> list[Tensor]:
        x, y = batch
        device = self._device
        use_autocast = self.autocast_dtype is not None and (
            device.type == "cuda" or not self.reference
        )
        ctx = (
            torch.autocast(device.type, dtype=self.autocast_dtype)
            if use_autocast
            else contextlib.nullcontext()
        )
        with ctx:
            out = _call_model(module, x)
            return [_call_loss(self.loss_fns[k], out, y) for k in self.loss_names]

    def _mode(self) -> contextlib.AbstractContextManager:
        if not self.freeze_bn:
            return contextlib.nullcontext()
        return _batchnorm_eval(self.module, whole_model=self.reference)

    def _probe_untouched(self, batch: Any) -> set[str]:
        """Names of the parameters that no loss reaches (autograd returns ``None`` for them)."""
        _, f = functional_loss(self.module, self._losses, freeze_running_stats=True)
        names = list(self._params)
        leaves = [self._params[n].detach().requires_grad_(True) for n in names]
        devices = [p.device for p in leaves if p.device.type == "cuda"]
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), self._mode():
            losses = f(dict(zip(names, leaves, strict=True)), batch)
            total = sum(loss.reshape(()) for loss in losses)
            if not total.requires_grad:
                return set(names)
            grads = torch.autograd.grad(total, leaves, allow_unused=True)
        return {n for n, g in zip(names, grads, strict=True) if g is None}

    # -----------------------------------------------------------------------------------------
    # public API

    def step(self, data_provider: Callable[[], tuple[Any, Any]]) -> dict[str, float | int | bool]:
        """One optimizer step's worth of accumulation + resolution; writes ``p.grad``.

        ``data_provider()`` returns the next ``(x, y)``; it is called ``accumulation_steps`` times.
        Returns the stats of spec §2.13 (``final_grad_norm``, ``step``, ``proj_iters``,
        ``min_cosine_sim``, ``raw_norm/<k>``, ``norm_ema/<k>``, ``loss/<k>``) plus
        ``min_cosine_after`` and ``skipped``.
        """
        if not callable(data_provider):
            raise TypeError(
                f"`data_provider` must be a callable returning (x, y), got {type(data_provider)}"
            )
        first: list[Any] = []

        def provider() -> Any:
            batch = data_provider()
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise ValueError("data_provider() must return a pair (x, y)")
            if not first:
                first.append(batch)
            return tuple(batch)

        scale = None
        if self.scaler is not None:
            # a 0-d tensor holding the current scale (also initialises the scaler lazily)
            scale = self.scaler.scale(torch.ones((), device=self._device))
        old = self._state
        with self._mode():
            self._state, grads = self._transform.update(
                self._state, self._params, provider, loss_scale=scale
            )
        if self._untouched is None:
            self._untouched = self._probe_untouched(first[0])

        stats_vec = torch.cat(
            [
                torch.stack(
                    [
                        self._state.final_grad_norm,
                        self._state.step.float(),
                        self._state.proj_iters.float(),
                        self._state.min_cosine_sim,
                        self._state.min_cosine_after,
                        self._state.skipped.float(),
                    ]
                ),
                self._state.raw_norms,
                self._state.norm_ema,
                self._state.losses,
            ]
        ).tolist()
        local_skip = bool(stats_vec[5])
        skipped = local_skip
        final_norm = stats_vec[0]  # of the (unscaled) output
        if self._sync_outputs():
            grads, skipped = self._sync(grads, local_skip)
            final_norm = math.sqrt(
                sum(
                    float(g.float().pow(2).sum())
                    for n, g in grads.items()
                    if n not in self._untouched  # type: ignore[operator]
                )
            )
        if skipped:
            self._state = discard_cycle(old, self._state)
            if not local_skip:  # skipped because another rank's cycle was
                self._state = self._state._replace(
                    skipped=torch.ones_like(self._state.skipped),
                    num_skipped=self._state.num_skipped + 1,
                )
            final_norm = 0.0  # nothing is applied on a skipped cycle
        self._write_grads(grads, skipped, scale)

        k = len(self.loss_names)
        stats: dict[str, float | int | bool] = {
            "final_grad_norm": final_norm,
            "step": int(stats_vec[1]),
            "proj_iters": stats_vec[2],
            "min_cosine_sim": stats_vec[3],
            "min_cosine_after": stats_vec[4],
            "skipped": skipped,
        }
        for i, name in enumerate(self.loss_names):
            stats[f"raw_norm/{name}"] = stats_vec[6 + i]
            stats[f"norm_ema/{name}"] = stats_vec[6 + k + i]
            stats[f"loss/{name}"] = stats_vec[6 + 2 * k + i]
        return stats

    def _module_params(self) -> dict[str, nn.Parameter]:
        named = dict(self.module.named_parameters())
        return {n: named[n] for n in self._params}

    def _write_grads(
        self, grads: Mapping[str, Tensor], skipped: bool, scale: Tensor | None
    ) -> None:
        """``p.grad`` = output (× scale with a scaler); a skipped cycle writes ``None`` (``+inf``
        with a scaler, so that ``scaler.step`` skips and ``scaler.update`` backs off)."""
        for name, p in self._module_params().items():
            if name in self._untouched:  # type: ignore[operator]
                p.grad = None
            elif skipped:
                p.grad = None if scale is None else poison_like(p)
            else:
                g = grads[name].detach()
                if scale is not None:
                    g = g.to(torch.promote_types(g.dtype, torch.float32)) * scale
                p.grad = g.to(p.dtype)

    def _sync_outputs(self) -> bool:
        """The per-rank schemes (``"broadcast"``, ``reference=True``) with a process group."""
        dist = torch.distributed
        return self._output_sync and dist.is_available() and dist.is_initialized()

    def _sync(self, grads: Mapping[str, Tensor], skipped: bool) -> tuple[dict[str, Tensor], bool]:
        """The outputs averaged (``"avg"``) or summed (``"broadcast"``, the reference) across
        ranks in float32, with a skip flag in the same all-reduce: any rank's skip skips all."""
        flag = torch.full((), float(skipped), dtype=torch.float32, device=self._device)
        reduced = all_reduce_mean({"grads": dict(grads), "flag": flag}, group=self.process_group)
        out = reduced["grads"]
        if self.ddp_sync == "broadcast":
            world = world_size(self.process_group)
            out = {n: g * world for n, g in out.items()}
        return out, bool(reduced["flag"] > 0)

    @property
    def state(self) -> ConductorState:
        """The functional state (a NamedTuple of tensors)."""
        return self._state

    def state_dict(self) -> dict[str, Any]:
        """A copy of the conductor's state: ``{"loss_names", "state": {path: tensor}}``
        (plain containers of tensors, loadable with ``torch.load(weights_only=True)``)."""
        keys, leaves = _state_items(self._state)
        return {
            "loss_names": list(self.loss_names),
            "state": {k: v.detach().clone() for k, v in zip(keys, leaves, strict=True)},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (tensors copied to the parameters' device)."""
        if not isinstance(state_dict, Mapping) or "state" not in state_dict:
            raise ValueError("load_state_dict: expected a dict from GradientConductor.state_dict()")
        names = list(state_dict.get("loss_names", []))
        if names != self.loss_names:
            raise ValueError(
                f"load_state_dict: the checkpoint has losses {names}, this conductor {self.loss_names}"
            )
        saved = state_dict["state"]
        keys, leaves = _state_items(self._state)
        missing = [k for k in keys if k not in saved]
        if missing:
            raise ValueError(f"load_state_dict: entries missing from the checkpoint: {missing}")
        new = []
        for key, cur in zip(keys, leaves, strict=True):
            value = torch.as_tensor(saved[key]).to(device=cur.device, dtype=cur.dtype)
            if key == "history" and value.shape != cur.shape:
                w = cur.shape[0]
                pad = torch.full((w,), -1, dtype=cur.dtype, device=cur.device)
                value = torch.cat([pad, value])[-w:] if w else cur.clone()
            if value.shape != cur.shape:
                raise ValueError(
                    f"load_state_dict: {key!r} has shape {tuple(value.shape)}, "
                    f"expected {tuple(cur.shape)}"
                )
            new.append(value.clone())
        treedef = optree.tree_structure(self._state._asdict())
        self._state = ConductorState(**optree.tree_unflatten(treedef, new))
