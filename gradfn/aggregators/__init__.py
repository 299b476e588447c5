"""Multi-task gradient aggregators (layer 3), Gramian first and compile-ready.

Each method is a pure function of task-stacked gradients, ``xxx(grads, ...) ->
Aggregated(grad, weights)``, and (except GradDrop) a weighting of their Gramian,
``xxx_weights(gram, ...) -> w`` with ``grad = Σ_k w_k g_k``. An :class:`Aggregator` is the
gradient-transform protocol of :mod:`gradfn.transforms` over task-stacked input:
``init(tasks)`` and ``update(state, grads, params=None, *, active=None, gram=None) -> (state,
Aggregated)``; stateful methods (GradVac, Nash-MTL, inverse-norm) keep NamedTuple states.
:func:`aggregator` builds one for any method, SON-GOKU takes one as its in-group aggregator, and
:func:`backward` runs one from an ``nn.Module`` loop and writes ``p.grad``. Every hot path is
tensor-only (fixed-iteration solvers, masks instead of branches) and compiles with
``torch.compile(fullgraph=True)``.

Methods: mean, sum, pcgrad, graddrop, cagrad, mgda, upgrad, dualproj, imtl_g, aligned_mtl,
gradvac, nash_mtl, config, gcond (GCond's resolution), fairgrad, inverse_norm.
"""

from gradfn.aggregators._adapters import (
    as_aggregator,
    as_gradient_transform,
    as_stateful_gradient_transform,
    backward,
    per_task_rows,
)
from gradfn.aggregators._aligned_mtl import aligned_mtl, aligned_mtl_weights
from gradfn.aggregators._base import Aggregated, Aggregator, CounterState, EmptyState
from gradfn.aggregators._cagrad import cagrad, cagrad_weights
from gradfn.aggregators._config import config, config_weights
from gradfn.aggregators._dualproj import dualproj, dualproj_weights
from gradfn.aggregators._fairgrad import fairgrad, fairgrad_weights
from gradfn.aggregators._gcond import gcond, gcond_weights
from gradfn.aggregators._graddrop import graddrop
from gradfn.aggregators._gradvac import GradVacState, gradvac, gradvac_init, gradvac_weights
from gradfn.aggregators._imtl_g import imtl_g, imtl_g_weights
from gradfn.aggregators._inverse_norm import (
    InverseNormState,
    inverse_norm,
    inverse_norm_init,
    inverse_norm_weights,
)
from gradfn.aggregators._mean import mean, mean_weights, sum_, sum_weights
from gradfn.aggregators._mgda import mgda, mgda_weights
from gradfn.aggregators._nash_mtl import (
    NashMTLState,
    nash_mtl,
    nash_mtl_init,
    nash_mtl_solve,
    nash_mtl_weights,
)
from gradfn.aggregators._pcgrad import pcgrad, pcgrad_weights
from gradfn.aggregators._qp import dual_cone_project, simplex_qp
from gradfn.aggregators._registry import METHODS, aggregator
from gradfn.aggregators._upgrad import upgrad, upgrad_weights

__all__ = [
    "METHODS",
    "Aggregated",
    "Aggregator",
    "CounterState",
    "EmptyState",
    "GradVacState",
    "InverseNormState",
    "NashMTLState",
    "aggregator",
    "aligned_mtl",
    "aligned_mtl_weights",
    "as_aggregator",
    "as_gradient_transform",
    "as_stateful_gradient_transform",
    "backward",
    "cagrad",
    "cagrad_weights",
    "config",
    "config_weights",
    "dual_cone_project",
    "dualproj",
    "dualproj_weights",
    "fairgrad",
    "fairgrad_weights",
    "gcond",
    "gcond_weights",
    "graddrop",
    "gradvac",
    "gradvac_init",
    "gradvac_weights",
    "imtl_g",
    "imtl_g_weights",
    "inverse_norm",
    "inverse_norm_init",
    "inverse_norm_weights",
    "mean",
    "mean_weights",
    "mgda",
    "mgda_weights",
    "nash_mtl",
    "nash_mtl_init",
    "nash_mtl_solve",
    "nash_mtl_weights",
    "pcgrad",
    "pcgrad_weights",
    "per_task_rows",
    "simplex_qp",
    "sum_",
    "sum_weights",
    "upgrad",
    "upgrad_weights",
]
