"""Adapters for ``nn.Module`` training (layer 5), with the published implementations' constructor
names and calls: :class:`SonGokuScheduler` (with :class:`TaskSpec` and :class:`TauSchedule`) and
:class:`GradientConductor`. Each holds ``(params, state)``, calls its algorithm's driver and writes
``p.grad``."""

from gradfn.adapters._conductor import GradientConductor
from gradfn.adapters._songoku import SonGokuScheduler
from gradfn.adapters._tasks import TaskSpec
from gradfn.schedules import TauSchedule

__all__ = ["GradientConductor", "SonGokuScheduler", "TaskSpec", "TauSchedule"]
