"""The per-task gradient engine (layer 2): task-stacked gradients ``J = ∂L/∂θ`` of ``K`` losses.

* :func:`value_and_per_task_grads` / :func:`per_task_grads`: ``J`` from one shared forward (or
  ``vmap(grad)`` over per-task batches), optionally for a subset of the tasks and with the
  parameters each task reaches.
* :func:`accumulate_per_task_grads`: ``J`` added into task-stacked buffers in place.
* :func:`value_and_weighted_grad`: the gradient of ``Σ_k w_k L_k`` in one backward.
* :func:`gramian`: ``G = J Jᵀ`` of ``K`` losses folded leaf by leaf, without the ``K × n`` rows.
* :func:`functional_loss`, :func:`split_module`: an ``nn.Module`` and ``loss_fn(module, batch)``
  as a pure ``f(params, batch)``.
"""

from gradfn.autodiff._accumulate import accumulate_per_task_grads
from gradfn.autodiff._engine import choose_strategy, per_task_grads, value_and_per_task_grads
from gradfn.autodiff._gramian import gramian
from gradfn.autodiff._module import functional_loss, split_module
from gradfn.autodiff._weighted import value_and_weighted_grad

__all__ = [
    "accumulate_per_task_grads",
    "choose_strategy",
    "functional_loss",
    "gramian",
    "per_task_grads",
    "split_module",
    "value_and_per_task_grads",
    "value_and_weighted_grad",
]
