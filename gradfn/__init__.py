"""gradfn: functional multi-task gradients for PyTorch.

Pure functions over parameter pytrees (optree), executed with ``torch.func``:

* :mod:`gradfn.tree` — pytree helpers (task-stacked gradients, Gramian, weighted sums).
* :mod:`gradfn.autodiff` — the per-task gradient engine (``per_task_grads``).
"""

from gradfn import aggregators, tree
from gradfn.autodiff import (
    choose_strategy,
    functional_loss,
    per_task_grads,
    split_module,
    value_and_per_task_grads,
    value_and_weighted_grad,
)
from gradfn.base import Transform

__version__ = "0.1.0"

__all__ = [
    "Transform",
    "__version__",
    "aggregators",
    "choose_strategy",
    "functional_loss",
    "per_task_grads",
    "split_module",
    "tree",
    "value_and_per_task_grads",
    "value_and_weighted_grad",
]
