"""gradfn: functional multi-task gradients for PyTorch.

Pure functions over parameter pytrees (optree), executed with ``torch.func``:

* :mod:`gradfn.tree` — pytree helpers (task-stacked gradients, Gramian, weighted sums).
* :mod:`gradfn.autodiff` — the per-task gradient engine (``per_task_grads``).
* :mod:`gradfn.graph`, :mod:`gradfn.coloring`, :mod:`gradfn.schedules`, :mod:`gradfn.sketch` —
  SON-GOKU's pieces; :func:`songoku` the transform, :class:`SonGokuScheduler` its adapter.
* :mod:`gradfn.resolve`, :mod:`gradfn.arbitrator`, :mod:`gradfn.transforms` — GradientConductor's
  pieces; :func:`conductor` the transform, :class:`GradientConductor` its adapter.
* :mod:`gradfn.aggregators` — PCGrad, MGDA, UPGrad, CAGrad, Nash-MTL, … on task-stacked gradients.
* :mod:`gradfn.distributed`, :mod:`gradfn.amp` — torch.distributed and mixed-precision helpers.
"""

from gradfn import aggregators, tree
from gradfn.autodiff import (
    accumulate_per_task_grads,
    choose_strategy,
    functional_loss,
    per_task_grads,
    split_module,
    value_and_per_task_grads,
    value_and_weighted_grad,
)
from gradfn.base import Transform
from gradfn.coloring import color, duplicate_min_coverage, groups_from_colors
from gradfn.conductor import ConductorState, conductor, reference_options
from gradfn.conductor_adapter import GradientConductor
from gradfn.graph import conflict_adjacency, interference
from gradfn.resolve import ResolveResult, resolve, resolve_gramian
from gradfn.schedules import TauSchedule, tau_value
from gradfn.sketch import sketch
from gradfn.songoku import SonGokuState, songoku
from gradfn.songoku_scheduler import SonGokuScheduler, TaskSpec

__version__ = "0.1.0"

__all__ = [
    "ConductorState",
    "GradientConductor",
    "ResolveResult",
    "SonGokuScheduler",
    "SonGokuState",
    "TaskSpec",
    "TauSchedule",
    "Transform",
    "__version__",
    "accumulate_per_task_grads",
    "aggregators",
    "choose_strategy",
    "color",
    "conductor",
    "conflict_adjacency",
    "duplicate_min_coverage",
    "functional_loss",
    "groups_from_colors",
    "interference",
    "per_task_grads",
    "reference_options",
    "resolve",
    "resolve_gramian",
    "sketch",
    "songoku",
    "split_module",
    "tau_value",
    "tree",
    "value_and_per_task_grads",
    "value_and_weighted_grad",
]
