"""Integrations (layer 6): :mod:`~gradfn.integrations.distributed` (averaging pytrees across
ranks, the reducers both algorithms take) and :mod:`~gradfn.integrations.amp` (loss scaling for
``torch.amp.GradScaler``)."""

from gradfn.integrations import amp, distributed

__all__ = ["amp", "distributed"]
