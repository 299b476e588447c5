"""Interference and conflict graphs (SON-GOKU, arXiv:2509.16959).

Everything is stated in the paper's sign convention: the *interference* of tasks ``i`` and ``j`` is
``ρ_ij = −cos(e_i, e_j)`` (positive when their gradients oppose), and the paper's conflict graph
has an edge ``(i, j)`` iff ``ρ_ij > τ`` (``⇔ cos_ij < −τ``).

Functions are pure and tensor-only (no host syncs), so they trace under ``torch.compile``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from gradfn._internal.checks import check_choice, check_finite, check_int, is_number, plain_scalars

__all__ = [
    "GRAPH_RULES",
    "GraphRule",
    "conflict_adjacency",
    "edge_density",
    "interference",
    "knn_k_for_density",
]

GraphRuleName = Literal["threshold", "quantile", "knn", "signed"]
GRAPH_RULES: tuple[str, ...] = ("threshold", "quantile", "knn", "signed")


def _check_square(name: str, x: Tensor) -> int:
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"`{name}` must be a square K×K matrix, got shape {tuple(x.shape)}")
    return int(x.shape[0])


def interference(gram: Tensor, eps: float = 1e-12) -> Tensor:
    """Interference matrix ``ρ = −cos`` from a Gramian ``G_ij = <e_i, e_j>`` (K×K).

    ``ρ_ij = −G_ij / ((‖e_i‖ + eps)(‖e_j‖ + eps))`` with ``‖e_i‖ = sqrt(G_ii)`` (paper §3,
    reference ``cosine_interference_matrix``), clamped to ``[−1, 1]``; the diagonal is 0, and the
    rows / columns of tasks with a zero (or non-finite) norm are 0 (such a task conflicts with
    nobody). Non-finite entries become 0. Returns a float32 (or wider) K×K tensor.
    """
    k = _check_square("gram", gram)
    if eps < 0:
        raise ValueError(f"`eps` must be ≥ 0, got {eps}")
    g = gram if gram.dtype in (torch.float32, torch.float64) else gram.to(torch.float32)
    # the symmetric part: ``E @ E.T`` is not always exactly symmetric (some BLAS kernels round the
    # two triangles differently); exact for a symmetric input
    g = g * 0.5 + g.T * 0.5
    sq = torch.diagonal(g)
    valid = torch.isfinite(sq) & (sq > 0)
    norms = torch.sqrt(torch.where(valid, sq, torch.ones_like(sq))) + eps
    cos = g / (norms[:, None] * norms[None, :])
    rho = (-cos).clamp(-1.0, 1.0)
    keep = valid[:, None] & valid[None, :] & torch.isfinite(rho)
    keep = keep & ~torch.eye(k, dtype=torch.bool, device=g.device)
    return torch.where(keep, rho, torch.zeros_like(rho))


def _upper(x: Tensor) -> Tensor:
    k = x.shape[0]
    iu = torch.triu_indices(k, k, offset=1, device=x.device)
    return x[iu[0], iu[1]]


def _hollow_symmetric(adj: Tensor) -> Tensor:
    k = adj.shape[0]
    adj = adj | adj.T
    return adj & ~torch.eye(k, dtype=torch.bool, device=adj.device)


def knn_k_for_density(density: float, num_tasks: int) -> int:
    """``k ≈ δ(K−1)/2`` neighbours per node for a target edge density ``δ`` (clamped to [1, K−1])."""
    k = round(float(density) * (num_tasks - 1) / 2)
    return int(min(max(k, 1), max(num_tasks - 1, 1)))


def _check_fraction(name: str, value: float) -> float:
    if not is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must lie in [0, 1], got {value!r}")
    return float(value)


def conflict_adjacency(
    rho: Tensor,
    tau: Tensor | float = 0.25,
    rule: GraphRuleName = "threshold",
    *,
    quantile: float = 0.3,
    knn_k: int = 3,
    density: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Conflict graph from the interference matrix ``ρ`` (K×K). Returns ``(adjacency, tau_used)``.

    ``adjacency`` is a K×K boolean tensor, symmetric and hollow. Rules (paper sign convention):

    * ``"threshold"`` (paper, Eq. 4): edge iff ``ρ_ij > τ`` (strict).
    * ``"signed"``: edge iff ``ρ_ij > 0`` (opposed gradients).
    * ``"quantile"``: edge iff ``ρ_ij`` is above the ``(1 − p)``-quantile of the upper-triangular
      ``ρ`` values, i.e. the fraction ``p = quantile`` most interfering pairs (``cos < q_p(cos)``).
    * ``"knn"``: every node marks its ``knn_k`` most interfering other nodes (ties by index),
      then the relation is symmetrised (OR with its transpose).

    ``density = δ`` (density matching, the paper's "DM" ablation): ``threshold`` uses the τ that
    leaves a fraction ``δ`` of pairs above it (the ``(1−δ)``-quantile of ρ, i.e. ``quantile`` with
    ``p = δ``), ``quantile`` uses ``p = δ``, ``knn`` uses ``k = clamp(round(δ(K−1)/2), 1, K−1)``,
    ``signed`` is unchanged. ``tau_used`` (0-d float tensor) is the effective ρ-threshold of the
    threshold / quantile rules (``τ``, or the quantile), 0 for ``signed`` and NaN for ``knn``.
    """
    k = _check_square("rho", rho)
    if rule not in GRAPH_RULES:
        raise ValueError(f"`rule` must be one of {GRAPH_RULES}, got {rule!r}")
    if density is not None:
        density = _check_fraction("density", density)
    quantile = _check_fraction("quantile", quantile)
    if not isinstance(tau, Tensor):
        tau = check_finite("tau", tau)
    device = rho.device
    r = rho.to(torch.float32) if rho.dtype not in (torch.float32, torch.float64) else rho
    tau_t = torch.as_tensor(tau, dtype=r.dtype, device=device).reshape(())
    empty = torch.zeros(k, k, dtype=torch.bool, device=device)

    if rule == "signed":
        return _hollow_symmetric(r > 0), torch.zeros((), dtype=r.dtype, device=device)
    if rule == "knn":
        kk = knn_k_for_density(density, k) if density is not None else int(knn_k)
        if kk < 0:
            raise ValueError(f"`knn_k` must be ≥ 0, got {knn_k}")
        kk = min(kk, k - 1)
        nan = torch.full((), float("nan"), dtype=r.dtype, device=device)
        if kk <= 0:
            return empty, nan
        # Most interfering first; the diagonal is pushed to the end; stable sort ⇒ ties by index.
        scores = torch.where(torch.eye(k, dtype=torch.bool, device=device), -torch.inf, r)
        order = torch.sort(-scores, dim=1, stable=True).indices[:, :kk]
        marks = torch.zeros(k, k, dtype=torch.bool, device=device)
        marks = marks.scatter(1, order, torch.ones_like(order, dtype=torch.bool))
        return _hollow_symmetric(marks), nan
    if rule == "quantile" or density is not None:
        p = density if density is not None else quantile
        if k < 2:
            return empty, tau_t
        # Stated on cosines like the reference (cos < q_p(cos)), then written back in ρ terms.
        q = torch.quantile(_upper(-r), p)
        return _hollow_symmetric(-r < q), -q
    return _hollow_symmetric(r > tau_t), tau_t


def edge_density(adjacency: Tensor) -> Tensor:
    """Fraction of the ``K(K−1)/2`` pairs that are edges (0-d float32; 0 when ``K < 2``)."""
    k = _check_square("adjacency", adjacency)
    pairs = max(k * (k - 1) // 2, 1)
    return _upper(adjacency).to(torch.float32).sum() / pairs


@dataclass(frozen=True)
class GraphRule:
    """How the conflict graph is built from ``ρ``: the arguments of :func:`conflict_adjacency`.

    Validated when built: ``rule`` one of :data:`GRAPH_RULES`, ``quantile`` and ``density`` in
    ``[0, 1]``, ``knn_k`` an integer ``≥ 0``.
    """

    rule: GraphRuleName = "threshold"
    quantile: float = 0.3
    knn_k: int = 3
    density: float | None = None

    def __post_init__(self) -> None:
        plain_scalars(self)
        check_choice("graph_rule", self.rule, GRAPH_RULES)
        object.__setattr__(self, "quantile", _check_fraction("graph_quantile", self.quantile))
        check_int("graph_knn_k", self.knn_k, 0)
        if self.density is not None:
            object.__setattr__(self, "density", _check_fraction("graph_density", self.density))

    def adjacency(self, rho: Tensor, tau: Tensor | float) -> tuple[Tensor, Tensor]:
        """``(adjacency, tau_used)`` of :func:`conflict_adjacency` with this rule."""
        return conflict_adjacency(
            rho, tau, self.rule, quantile=self.quantile, knn_k=self.knn_k, density=self.density
        )
