"""Integrations (layer 6): :mod:`~gradfn.integrations.distributed` (averaging pytrees across
ranks, the reducers both algorithms take), :mod:`~gradfn.integrations.amp` (loss scaling for
``torch.amp.GradScaler``) and :mod:`~gradfn.integrations.logging` (the algorithms' states as flat
``{key: float}`` dicts for any logger). :mod:`gradfn.integrations.lightning` (PyTorch Lightning,
the ``lightning`` extra) is imported on its own: ``from gradfn.integrations.lightning import
GradfnModule``."""

from gradfn.integrations import amp, distributed, logging
from gradfn.integrations.logging import aggregated_metrics, conductor_metrics, songoku_metrics

__all__ = [
    "aggregated_metrics",
    "amp",
    "conductor_metrics",
    "distributed",
    "logging",
    "songoku_metrics",
]
