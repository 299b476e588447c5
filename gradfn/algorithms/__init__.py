"""The two published algorithms (layer 4), each an ``(init, update)`` algorithm with
``update(state, params, batch) -> (state, grads)`` (:class:`Algorithm`):

* :func:`songoku`: SON-GOKU (arXiv:2509.16959), interference-graph colouring of the tasks;
* :func:`conductor`: GradientConductor (arXiv:2509.07252), accumulation and conflict resolution.
"""

from gradfn.algorithms._base import Algorithm
from gradfn.algorithms._conductor import (
    Conductor,
    ConductorConfig,
    ConductorState,
    ConductorStats,
    Cycle,
    ResolutionState,
    conductor,
    reference_options,
)
from gradfn.algorithms._songoku import (
    SonGoku,
    SonGokuConfig,
    SonGokuState,
    TaskGrads,
    active_mask,
    group_lists,
    songoku,
    task_grads,
    touched_mask,
)

__all__ = [
    "Algorithm",
    "Conductor",
    "ConductorConfig",
    "ConductorState",
    "ConductorStats",
    "Cycle",
    "ResolutionState",
    "SonGoku",
    "SonGokuConfig",
    "SonGokuState",
    "TaskGrads",
    "active_mask",
    "conductor",
    "group_lists",
    "reference_options",
    "songoku",
    "task_grads",
    "touched_mask",
]
