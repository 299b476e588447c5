"""Multi-task gradient aggregators (DESIGN.md layer 3), Gramian first and compile-ready.

Each method is a pure function of task-stacked gradients, ``xxx(grads, ...) ->
Aggregated(grad, weights)``, and (except GradDrop) a weighting of their Gramian,
``xxx_weights(gram, ...) -> w`` with ``grad = Σ_k w_k g_k``. Stateful methods (GradVac,
Nash-MTL) are ``(init, update)`` pairs over NamedTuple states. :func:`aggregator` builds the
common :class:`Aggregator` protocol for any method; :func:`as_gradient_transform` adapts it to
SON-GOKU's in-group hook; :func:`backward` runs it from an ``nn.Module`` loop and writes
``p.grad``. Every hot path is tensor-only (fixed-iteration solvers, masks instead of branches)
and compiles with ``torch.compile(fullgraph=True)``.

Methods: mean, sum, pcgrad, graddrop, cagrad, mgda, upgrad, dualproj, imtl_g, aligned_mtl,
gradvac, nash_mtl, config, gcond (GCond's resolution).
"""

from gradfn.aggregators._adapters import (
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
from gradfn.aggregators._gcond import gcond, gcond_weights
from gradfn.aggregators._graddrop import graddrop
from gradfn.aggregators._gradvac import GradVacState, gradvac, gradvac_init, gradvac_weights
from gradfn.aggregators._imtl_g import imtl_g, imtl_g_weights
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
    "NashMTLState",
    "aggregator",
    "aligned_mtl",
    "aligned_mtl_weights",
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
    "gcond",
    "gcond_weights",
    "graddrop",
    "gradvac",
    "gradvac_init",
    "gradvac_weights",
    "imtl_g",
    "imtl_g_weights",
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
