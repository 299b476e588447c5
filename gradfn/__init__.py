"""gradfn: functional multi-task gradients for PyTorch.

Pure functions over parameter pytrees (optree), executed with ``torch.func``; the packages are the
layers, each importing only those beneath it:

1. :mod:`gradfn.tree` (and :mod:`gradfn.typing`): pytree helpers, task-stacked gradients, Gramians.
2. :mod:`gradfn.autodiff`: the per-task gradient engine (``value_and_per_task_grads``).
3. :mod:`gradfn.transforms` (the ``(init, update)`` gradient-transform protocol),
   :mod:`gradfn.aggregators` (PCGrad, MGDA, UPGrad, CAGrad, Nash-MTL, …),
   :mod:`gradfn.conflict` (interference, colouring, sketches, GCond's resolution),
   :mod:`gradfn.schedules` (``τ(t)``), :mod:`gradfn.weighting` (loss weighting: DWA, RLW,
   uncertainty, IMTL-L, FAMO, GradNorm).
4. :mod:`gradfn.algorithms`: :func:`songoku` (SON-GOKU) and :func:`conductor` (GradientConductor),
   ``update(state, params, batch) -> (state, grads)``.
5. :mod:`gradfn.adapters`: :class:`SonGokuScheduler` and :class:`GradientConductor` for
   ``nn.Module`` training, with the published implementations' names.
6. :mod:`gradfn.integrations`: ``torch.distributed``, mixed precision and logging
   (:func:`songoku_metrics`, :func:`conductor_metrics`, :func:`aggregated_metrics`).
"""

import sys as _sys
from typing import Any

from gradfn import (
    adapters,
    aggregators,
    algorithms,
    autodiff,
    conflict,
    integrations,
    schedules,
    transforms,
    tree,
    weighting,
)
from gradfn._deprecated import MODULE_NAMES as _MODULE_NAMES
from gradfn._deprecated import TOP_LEVEL as _TOP_LEVEL
from gradfn._deprecated import install as _install_deprecated
from gradfn._deprecated import moved as _moved
from gradfn.adapters import GradientConductor, SonGokuScheduler, TaskSpec
from gradfn.algorithms import (
    Algorithm,
    ConductorConfig,
    ConductorState,
    SonGokuConfig,
    SonGokuState,
    conductor,
    reference_options,
    songoku,
)
from gradfn.autodiff import (
    accumulate_per_task_grads,
    functional_loss,
    per_task_grads,
    split_module,
    value_and_per_task_grads,
    value_and_weighted_grad,
)
from gradfn.integrations.logging import aggregated_metrics, conductor_metrics, songoku_metrics
from gradfn.schedules import TauSchedule
from gradfn.transforms import GradientTransform

__version__ = "0.2.0"

__all__ = [
    "Algorithm",
    "ConductorConfig",
    "ConductorState",
    "GradientConductor",
    "GradientTransform",
    "SonGokuConfig",
    "SonGokuScheduler",
    "SonGokuState",
    "TaskSpec",
    "TauSchedule",
    "__version__",
    "accumulate_per_task_grads",
    "adapters",
    "aggregated_metrics",
    "aggregators",
    "algorithms",
    "autodiff",
    "conductor",
    "conductor_metrics",
    "conflict",
    "functional_loss",
    "integrations",
    "per_task_grads",
    "reference_options",
    "schedules",
    "songoku",
    "songoku_metrics",
    "split_module",
    "transforms",
    "tree",
    "value_and_per_task_grads",
    "value_and_weighted_grad",
    "weighting",
]

_install_deprecated()


def __getattr__(name: str) -> Any:
    """gradfn 0.1 top-level names and modules that moved into a package (deprecated, removed
    in 0.3)."""
    if name in _TOP_LEVEL:
        return _moved(f"gradfn.{name}", _TOP_LEVEL[name])
    if name in _MODULE_NAMES:  # ``import gradfn.graph`` then ``gradfn.graph.interference``
        return _sys.modules[f"gradfn.{name}"]
    raise AttributeError(f"module 'gradfn' has no attribute {name!r}")
