"""Conflict geometry in ``K×K`` space (layer 3), shared by both algorithms.

* SON-GOKU (arXiv:2509.16959): :func:`interference` ``ρ = −cos``, :func:`conflict_adjacency` /
  :class:`GraphRule` (threshold, quantile, kNN, signed, density matching), Welsh–Powell
  :func:`color`, :func:`groups_from_colors`, :func:`duplicate_min_coverage`, and :func:`sketch`
  (CountSketch / Rademacher projections for the sketched EMA); :func:`streamed_sketch` projects
  per-task gradients leaf by leaf in one batched backward, without the ``K × n`` rows.
* GCond (arXiv:2509.07252): :func:`resolve_gramian` / :func:`resolve` (smooth and three-zone rules in
  coefficient space), :func:`resolve_vectors` (the same loop as the reference's in-place vector
  passes, for bfloat16 gradients) and its arbitrator (:func:`second_wins`, :func:`stability`, the winner ring).
"""

from gradfn.conflict._arbitrator import (
    DominanceRule,
    arbitrate,
    init_history,
    is_dominant,
    push_history,
    second_wins,
    stability,
)
from gradfn.conflict._coloring import (
    color,
    duplicate_min_coverage,
    groups_from_colors,
    welsh_powell_order,
)
from gradfn.conflict._interference import (
    GRAPH_RULES,
    GraphRule,
    conflict_adjacency,
    edge_density,
    interference,
    knn_k_for_density,
)
from gradfn.conflict._resolve import (
    ResolveResult,
    Rule,
    check_thresholds,
    cross_gramian,
    gramian_and_cross,
    pair_cosines,
    resolve,
    resolve_gramian,
    true_min_cosine,
)
from gradfn.conflict._resolve_vectors import resolve_vectors, vector_dots
from gradfn.conflict._sketch import (
    SKETCH_METHODS,
    count_sketch_hashes,
    projection_block,
    sketch,
    streamed_sketch,
)

__all__ = [
    "GRAPH_RULES",
    "SKETCH_METHODS",
    "DominanceRule",
    "GraphRule",
    "ResolveResult",
    "Rule",
    "arbitrate",
    "check_thresholds",
    "color",
    "conflict_adjacency",
    "count_sketch_hashes",
    "cross_gramian",
    "duplicate_min_coverage",
    "edge_density",
    "gramian_and_cross",
    "groups_from_colors",
    "init_history",
    "interference",
    "is_dominant",
    "knn_k_for_density",
    "pair_cosines",
    "projection_block",
    "push_history",
    "resolve",
    "resolve_gramian",
    "resolve_vectors",
    "second_wins",
    "sketch",
    "stability",
    "streamed_sketch",
    "true_min_cosine",
    "vector_dots",
    "welsh_powell_order",
]
