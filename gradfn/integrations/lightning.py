"""PyTorch Lightning: :class:`GradfnModule`, a ``LightningModule`` trained by gradfn with manual
optimisation, and :class:`AggregatorBackward` (an aggregator's backward with its state kept).

gradfn needs the ``K`` per-task losses (or batches) and runs its own backward, writing ``p.grad``;
Lightning's automatic optimisation expects one scalar loss and calls ``loss.backward()`` itself.
With manual optimisation (``automatic_optimization = False``) the training step owns
zero_grad → backward → step, and Lightning keeps the rest: the optimizer wrapper, the precision
plugin's ``GradScaler`` step, checkpointing, logging and the loops.

Needs the ``lightning`` extra: ``pip install "gradfn[lightning]"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradfn.adapters import GradientConductor, SonGokuScheduler
from gradfn.adapters._common import from_plain, plain_state
from gradfn.aggregators import Aggregated, Aggregator, as_aggregator
from gradfn.aggregators import backward as aggregators_backward
from gradfn.integrations.logging import aggregated_metrics, conductor_metrics, songoku_metrics

_FLOOR = "2.2"  # the precision plugins' names (MixedPrecision, …) since Lightning 2.2

try:
    import lightning
    import lightning.pytorch as pl
except ImportError as err:  # a test hides lightning to check this message
    raise ImportError(
        "gradfn.integrations.lightning needs PyTorch Lightning (the `lightning` package): "
        'pip install "gradfn[lightning]"'
    ) from err
try:
    from lightning.pytorch.plugins.precision import (
        DoublePrecision,
        HalfPrecision,
        MixedPrecision,
        Precision,
    )
except ImportError as err:
    raise ImportError(
        f"gradfn.integrations.lightning needs lightning>={_FLOOR}, found "
        f'{getattr(lightning, "__version__", "?")}: pip install "gradfn[lightning]"'
    ) from err

__all__ = ["AggregatorBackward", "GradfnModule", "Method", "precision_kwargs"]

_VERSION = 1


class AggregatorBackward:
    """:func:`gradfn.aggregators.backward` on a fixed set of parameters, with the aggregator's
    state kept between calls and checkpointed (``state_dict`` / ``load_state_dict``).

    Args:
        params: an ``nn.Module`` (its trainable parameters) or a name → tensor mapping.
        agg: an :class:`~gradfn.aggregators.Aggregator` or a method name (``"upgrad"``, …).
        task_names: the ``K`` task names, for :meth:`metrics` (None: ``"0"``, ``"1"``, …).
        **options: ``shared``, ``strategy`` and the method's hyper-parameters, as
            :func:`~gradfn.aggregators.backward` takes them.
    """

    def __init__(
        self,
        params: nn.Module | Mapping[str, Tensor],
        agg: Aggregator | str,
        *,
        task_names: Sequence[str] | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(params, (nn.Module, Mapping)):
            raise TypeError(
                f"`params` must be an nn.Module or a name -> tensor dict, got {type(params).__name__}"
            )
        if not isinstance(agg, (Aggregator, str)):
            raise TypeError(
                f"`agg` must be an Aggregator or a method name, got {type(agg).__name__}"
            )
        hparams = {k: v for k, v in options.items() if k not in ("shared", "strategy")}
        self.params, self.task_names = params, None if task_names is None else list(task_names)
        self.agg = as_aggregator(agg, hparams)
        self.options = {k: v for k, v in options.items() if k in ("shared", "strategy")}
        self.state: Any = None
        self.tasks: int | None = None
        self.last: Aggregated | None = None

    def backward(self, losses: Any) -> Aggregated:
        """``K`` losses (a sequence, a dict or a ``(K,)`` tensor) → ``.grad += Σ_k w_k g_k``
        (:func:`~gradfn.aggregators.backward`); returns the :class:`~gradfn.aggregators.Aggregated`.
        Raises ValueError on a non-finite loss or gradient (nothing is written)."""
        self.state, out = aggregators_backward(
            losses, self.params, self.agg, state=self.state, **self.options
        )
        self.tasks, self.last = int(out.weights.shape[0]), out
        return out

    def metrics(self, prefix: str = "aggregator/") -> dict[str, float]:
        """:func:`~gradfn.integrations.logging.aggregated_metrics` of the last call ({} before)."""
        return {} if self.last is None else aggregated_metrics(self.last, self.task_names, prefix)

    def state_dict(self) -> dict[str, Any]:
        """The aggregator's state as plain containers of tensor copies (None before a call)."""
        plain = None if self.state is None else plain_state(self.state)
        return {"version": _VERSION, "tasks": self.tasks, "state": plain}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` onto the parameters' device."""
        if not isinstance(state_dict, Mapping) or state_dict.get("version") != _VERSION:
            raise ValueError("load_state_dict: not an AggregatorBackward state_dict")
        if state_dict["state"] is None:
            self.state, self.tasks = None, None
            return
        tasks = int(state_dict["tasks"])
        params = self.params
        first = next(
            iter(params.parameters() if isinstance(params, nn.Module) else params.values())
        )
        template = self.agg.init(tasks, device=first.device)
        self.state = from_plain(template, state_dict["state"], "aggregator state")
        self.tasks = tasks


Method = SonGokuScheduler | GradientConductor | AggregatorBackward
"""What :meth:`GradfnModule.configure_gradfn` returns."""


def precision_kwargs(trainer: Any) -> dict[str, Any]:
    """``{"autocast_dtype", "scaler"}`` for a gradfn adapter under ``trainer``'s precision:
    ``"bf16-mixed"`` → ``torch.bfloat16`` and no scaler; ``"16-mixed"`` → ``torch.float16`` and
    the plugin's ``GradScaler`` (the adapter writes ``p.grad = g · scale``; the plugin's step
    unscales it once); full and half precision (``"32-true"``, ``"bf16-true"``…) → ``None``.

    Raises:
        ValueError: another precision plugin (e.g. DeepSpeed's or FSDP's), untested with gradfn.
    """
    if trainer is None:
        return {"autocast_dtype": None, "scaler": None}
    plugin = trainer.precision_plugin
    if isinstance(plugin, MixedPrecision):
        dtype = torch.bfloat16 if plugin.precision == "bf16-mixed" else torch.float16
        return {"autocast_dtype": dtype, "scaler": plugin.scaler}
    if type(plugin) in (Precision, DoublePrecision, HalfPrecision):
        return {"autocast_dtype": None, "scaler": None}
    raise ValueError(
        f"gradfn's Lightning integration supports the Trainer precisions '32-true', '64-true', "
        f"'bf16-mixed', '16-mixed', 'bf16-true' and '16-true'; got the plugin {type(plugin).__name__}"
    )


def _no_autocast(trainer: Any) -> contextlib.AbstractContextManager[Any]:
    """Lightning runs ``training_step`` under the plugin's autocast; gradfn's statistics and
    decisions run outside it (the adapters autocast the task forwards themselves)."""
    plugin = None if trainer is None else trainer.precision_plugin
    if isinstance(plugin, MixedPrecision):
        return torch.autocast(plugin.device, enabled=False)
    return contextlib.nullcontext()


def _provider(inputs: Any, n: int) -> Callable[[], Any]:
    """GradientConductor's ``data_provider``: a callable as it is, or a list of ``n`` micro-batches."""
    if callable(inputs):
        return inputs
    if not isinstance(inputs, list):
        raise TypeError(
            "gradfn_step with a GradientConductor takes a data provider (a callable returning "
            f"(x, y)) or a list of accumulation_steps={n} micro-batches, got {type(inputs).__name__}"
        )
    if len(inputs) != n:
        raise ValueError(f"gradfn_step: {len(inputs)} micro-batches for accumulation_steps={n}")
    batches: Iterator[Any] = iter(inputs)
    return lambda: next(batches)


class GradfnModule(pl.LightningModule):
    """A ``LightningModule`` trained by gradfn (manual optimisation).

    Subclass it, build the gradfn method in :meth:`configure_gradfn`, return one optimizer from
    ``configure_optimizers`` and call :meth:`gradfn_step` in ``training_step``:

    * SON-GOKU: ``configure_gradfn`` returns ``SonGokuScheduler(self, tasks, None, **amp)``;
      ``gradfn_step({task: batch})``.
    * GradientConductor: ``GradientConductor(self, loss_fns, lambdas, n, **amp)``;
      ``gradfn_step(provider)`` or ``gradfn_step([micro_batch] * n)``.
    * an aggregator: ``AggregatorBackward(self, "upgrad")``; ``gradfn_step(losses)`` with the
      ``K`` losses of a forward run in ``training_step``.

    The method is built on the first :meth:`gradfn_step` (the model is on its device then) and
    saved with the model in Lightning's checkpoints (key ``"gradfn"``): a subclass overriding
    ``on_save_checkpoint`` / ``on_load_checkpoint`` calls ``super()``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self._gradfn: Method | None = None
        self._gradfn_loaded: Mapping[str, Any] | None = None

    def configure_gradfn(self, autocast_dtype: torch.dtype | None, scaler: Any) -> Method:
        """Return the gradfn method. ``autocast_dtype`` and ``scaler`` come from the Trainer's
        precision (:func:`precision_kwargs`): pass them to a ``SonGokuScheduler`` or a
        ``GradientConductor``."""
        raise NotImplementedError("a GradfnModule must implement configure_gradfn")

    @property
    def gradfn(self) -> Method:
        """The gradfn method (built by :meth:`configure_gradfn` on first use)."""
        if self._gradfn is None:
            amp = precision_kwargs(self._trainer)
            method = self.configure_gradfn(**amp)
            if not isinstance(method, (SonGokuScheduler, GradientConductor, AggregatorBackward)):
                raise TypeError(
                    "configure_gradfn must return a SonGokuScheduler, a GradientConductor or an "
                    f"AggregatorBackward, got {type(method).__name__}"
                )
            if isinstance(method, AggregatorBackward) and amp["scaler"] is not None:
                raise ValueError(
                    "precision='16-mixed' (a GradScaler) with an aggregator is not supported: "
                    "gradfn.aggregators.backward takes no loss scale; use 'bf16-mixed' or an adapter"
                )
            if isinstance(method, SonGokuScheduler) and method.optimizer is not None:
                raise ValueError(
                    "configure_gradfn: build the SonGokuScheduler with optimizer=None (Lightning "
                    "steps the optimizer from configure_optimizers)"
                )
            if self._gradfn_loaded is not None:
                method.load_state_dict(self._gradfn_loaded)
                self._gradfn_loaded = None
            self._gradfn = method
        return self._gradfn

    def gradfn_step(self, inputs: Any) -> Any:
        """zero_grad → the method's backward (writes ``p.grad``) → the optimizer's step.

        ``inputs``: SON-GOKU ``{task: batch}``; GradientConductor a data provider or a list of
        micro-batches; an aggregator the ``K`` losses. Returns what the method's backward
        returns: SON-GOKU ``{"losses", "active", "skipped", "step"}``, GradientConductor its
        stats, an aggregator the :class:`~gradfn.aggregators.Aggregated`. A step gradfn skips
        (non-finite) leaves the parameters unchanged (no gradient, or ``+inf`` for the scaler).
        """
        if self.automatic_optimization:
            raise RuntimeError(
                "gradfn_step needs manual optimisation: automatic_optimization=False"
            )
        method = self.gradfn
        opt = self.optimizers()
        if isinstance(opt, list):
            raise ValueError(
                f"gradfn_step: configure_optimizers must return one optimizer, got {len(opt)}"
            )
        opt.zero_grad(set_to_none=True)
        with _no_autocast(self._trainer):
            if isinstance(method, SonGokuScheduler):
                out: Any = method.backward(inputs)
            elif isinstance(method, GradientConductor):
                out = method.backward(_provider(inputs, method.accumulation_steps))
            else:
                out = method.backward(inputs)
        opt.step()
        return out

    def gradfn_metrics(self) -> dict[str, float]:
        """What the method decided at the last step, as ``{key: float}`` for ``self.log_dict``
        (:mod:`gradfn.integrations.logging`); {} before the first step."""
        method = self._gradfn
        if isinstance(method, SonGokuScheduler):
            return {} if method.state is None else songoku_metrics(method.state, method.names)
        if isinstance(method, GradientConductor):
            return conductor_metrics(method.state, method.loss_names)
        return {} if method is None else method.metrics()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the gradfn state under ``checkpoint["gradfn"]``."""
        if self._gradfn is not None:
            checkpoint["gradfn"] = self._gradfn.state_dict()
        elif self._gradfn_loaded is not None:  # restored, not yet stepped
            checkpoint["gradfn"] = self._gradfn_loaded

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep ``checkpoint["gradfn"]`` for the method, rebuilt at the next step."""
        self._gradfn, self._gradfn_loaded = None, checkpoint.get("gradfn")
