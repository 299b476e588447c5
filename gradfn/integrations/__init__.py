"""Integrations (layer 6): :mod:`~gradfn.integrations.distributed` (averaging pytrees across
ranks, the reducers both algorithms take), :mod:`~gradfn.integrations.fsdp` (per-task gradients
and a Gramian aggregator on FSDP2-sharded parameters), :mod:`~gradfn.integrations.amp` (loss scaling for
``torch.amp.GradScaler``), :mod:`~gradfn.integrations.logging` (the algorithms' states as flat
``{key: float}`` dicts for any logger) and :mod:`~gradfn.integrations.tensorboard` (images of
SON-GOKU's interference matrix and schedule; optional extra ``tensorboard``).
:mod:`gradfn.integrations.lightning` (PyTorch Lightning, the ``lightning`` extra) is imported on
its own: ``from gradfn.integrations.lightning import GradfnModule``."""

from gradfn.integrations import amp, distributed, fsdp, logging, tensorboard
from gradfn.integrations.logging import aggregated_metrics, conductor_metrics, songoku_metrics
from gradfn.integrations.tensorboard import (
    ScheduleRecorder,
    interference_image,
    log_to_tensorboard,
    schedule_image,
)

__all__ = [
    "ScheduleRecorder",
    "aggregated_metrics",
    "amp",
    "conductor_metrics",
    "distributed",
    "fsdp",
    "interference_image",
    "log_to_tensorboard",
    "logging",
    "schedule_image",
    "songoku_metrics",
    "tensorboard",
]
