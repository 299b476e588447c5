"""GradVac (Wang et al. 2021, "Gradient Vaccine", ICLR), stateful, in K-space as in TorchJD.

For each task ``i`` and each other task ``j`` (in a random order), with ``φ_ij`` the cosine of
the current ``g_i^PC`` and the original ``g_j`` and ``φ̂_ij`` its EMA target: if
``φ_ij < φ̂_ij``, add ``w g_j`` to ``g_i^PC`` with
``w = ‖g_i^PC‖ (φ̂ √(1−φ²) − φ √(1−φ̂²)) / (‖g_j‖ √(1−φ̂²) + eps)``; then
``φ̂_ij ← (1−β) φ̂_ij + β φ_ij``. The update is ``Σ_i g_i^PC``. All rows advance together
(``K − 1`` vectorised steps); the state holds ``φ̂`` (``K×K``, zeros at init) and the seed/counter
of the visiting orders.

Two tasks (eagerly on the CPU): each row has one other task, so one step per row in Python floats:
both rows share ``φ = ⟨g₁, g₂⟩ / (‖g₁‖‖g₂‖ + eps)`` and the update is
``(1 + w₂₁) g₁ + (1 + w₁₂) g₂``, each ``w_ij`` the coefficient above with the pair's own target.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from gradfn._internal.checks import check_float, check_nonnegative
from gradfn._internal.prng import fold_in, permutations
from gradfn.aggregators._base import (
    Aggregator,
    check_active,
    check_gram,
    from_stateful_weighting,
    host_values,
    restrict,
)

__all__ = ["GradVacState", "gradvac", "gradvac_init", "gradvac_weights"]


class GradVacState(NamedTuple):
    """``phi``: EMA cosine targets ``φ̂`` (``K×K`` float64); ``seed``, ``count``: 0-d int64."""

    phi: Tensor
    seed: Tensor
    count: Tensor  # type: ignore[assignment]  # a field named like tuple.count


def gradvac_init(
    num_tasks: int, *, seed: int = 0, device: torch.device | str | None = None
) -> GradVacState:
    """Zero targets for ``num_tasks`` tasks."""
    if num_tasks <= 0:
        raise ValueError(f"gradvac_init: `num_tasks` must be positive, got {num_tasks}")
    z = torch.zeros((), dtype=torch.int64, device=device)
    phi = torch.zeros(num_tasks, num_tasks, dtype=torch.float64, device=device)
    return GradVacState(phi, z + seed, z)


def _others_order(key: Tensor, k: int, device: torch.device) -> Tensor:
    perm = permutations(key, k, max(k - 1, 1), device=device)[:, : k - 1]
    rows = torch.arange(k, device=device)[:, None]
    return perm + (perm >= rows).to(perm.dtype)


def _two_tasks_host(
    gram: list[list[float]], phi: list[list[float]], beta: float, eps: float
) -> tuple[list[list[float]], list[float]] | None:
    """One two-task step in Python floats (float64, the operations of the tensor loop):
    ``(new targets, w)`` for ``2×2`` nested lists, or None for a non-finite ``G``; ``eps > 0``
    (no division by zero)."""
    (g00, g01), (g10, g11) = gram
    if not all(map(math.isfinite, (g00, g01, g10, g11))):
        return None
    dot = (g01 + g10) * 0.5
    n0, n1 = math.sqrt(max(g00, 0.0)), math.sqrt(max(g11, 0.0))
    out = [0.0, 0.0]  # out[i]: row i's correction w, added to the weight of task j = 1 − i
    new = [row[:] for row in phi]
    for i, (ni, nj) in enumerate(((n0, n1), (n1, n0))):
        cos = dot / (ni * nj + eps)
        hat = phi[i][1 - i]
        if cos < hat:
            s_phi = math.sqrt(max(1.0 - cos * cos, 0.0))
            s_hat = math.sqrt(max(1.0 - hat * hat, 0.0))
            out[i] = ni * (hat * s_phi - cos * s_hat) / (nj * s_hat + eps)
        new[i][1 - i] = (1.0 - beta) * hat + beta * cos
    return new, [1.0 + out[1], 1.0 + out[0]]


def gradvac_weights(
    state: GradVacState,
    gram: Tensor,
    *,
    beta: float = 0.5,
    eps: float = 1e-8,
    order: Tensor | None = None,
    active: Tensor | None = None,
) -> tuple[GradVacState, Tensor]:
    """One GradVac step on the Gramian: ``(new_state, w)``.

    ``order`` (optional, ``(K, K−1)``): row ``i`` lists the other tasks in visiting order
    (default: random from the state's seed and counter). Inactive tasks (``active``) are neither
    corrected nor used, and their targets are kept.
    """
    k = check_gram(gram, "gradvac_weights")
    check_active(active, k, "gradvac_weights")
    if state.phi.shape != (k, k):
        raise ValueError(f"gradvac_weights: state is for {state.phi.shape[0]} tasks, gram has {k}")
    if not 0.0 <= beta <= 1.0 or eps < 0:
        raise ValueError("gradvac_weights: need 0 ≤ beta ≤ 1 and eps ≥ 0")
    if k == 2 and active is None and order is None and eps > 0:
        host = host_values(gram)  # eager CPU: the two-task step in Python floats
        host_phi = None if host is None else host_values(state.phi)
        if host is not None and host_phi is not None:
            step = _two_tasks_host(host, host_phi, beta, eps)
            if step is None:  # non-finite: NaN weights, targets kept
                return GradVacState(state.phi, state.seed, state.count + 1), torch.full(
                    (2,), math.nan, dtype=gram.dtype
                )
            phi = torch.tensor(step[0], dtype=state.phi.dtype)
            return GradVacState(phi, state.seed, state.count + 1), torch.tensor(
                step[1], dtype=gram.dtype
            )
    g, a = restrict(gram, active)
    if order is None and k <= 2:  # at most one other task: the order is not random
        order = (1 - torch.arange(k, device=g.device))[:, None][:, : k - 1]
    elif order is None:
        order = _others_order(fold_in(state.seed, state.count), k, g.device)
    elif order.shape != (k, k - 1):
        raise ValueError(
            f"gradvac_weights: `order` must be ({k}, {k - 1}), got {tuple(order.shape)}"
        )
    order = order.to(device=g.device, dtype=torch.int64)
    phi_t = state.phi.to(device=g.device, dtype=g.dtype)
    on = a > 0
    diag = torch.diagonal(g).clamp_min(0.0)
    norm_all = diag.sqrt()
    c = torch.eye(k, dtype=g.dtype, device=g.device)
    cg = g.clone()  # row i: ⟨g_i^PC, g_j⟩ for every j
    rows = torch.arange(k, device=g.device)
    for t in range(k - 1):
        j = order[:, t]
        valid = on & on[j]
        onehot = torch.nn.functional.one_hot(j, k).to(g.dtype)
        dot = (cg * onehot).sum(1)
        norm_i = (cg * c).sum(1).clamp_min(0.0).sqrt()
        norm_j = norm_all[j]
        phi = dot / (norm_i * norm_j + eps)
        hat = phi_t[rows, j]
        fix = valid & (phi < hat)
        s_phi = (1.0 - phi * phi).clamp_min(0.0).sqrt()
        s_hat = (1.0 - hat * hat).clamp_min(0.0).sqrt()
        w = norm_i * (hat * s_phi - phi * s_hat) / (norm_j * s_hat + eps)
        w = torch.where(fix, w, 0.0)
        c = c + w[:, None] * onehot
        cg = cg + w[:, None] * g[j]
        new_hat = torch.where(valid, (1.0 - beta) * hat + beta * phi, hat)
        phi_t = torch.where(onehot > 0, new_hat[:, None], phi_t)
    finite = torch.isfinite(gram).all()
    w_out = torch.where(finite, (c * a[:, None]).sum(0), float("nan")).to(gram.dtype)
    new_phi = torch.where(finite, phi_t, state.phi.to(phi_t.device)).to(state.phi.dtype)
    return GradVacState(new_phi, state.seed, state.count + 1), w_out


def gradvac(*, beta: float = 0.5, eps: float = 1e-8, seed: int = 0) -> Aggregator:
    """The GradVac :class:`Aggregator` (stateful)."""
    beta = check_float("beta", beta, 0.0, 1.0, open_high=False)
    eps = check_nonnegative("eps", eps)

    def init(num_tasks: int, *, device: torch.device | str | None = None) -> GradVacState:
        return gradvac_init(num_tasks, seed=seed, device=device)

    def weights(
        state: GradVacState, gram: Tensor, *, active: Tensor | None = None
    ) -> tuple[GradVacState, Tensor]:
        return gradvac_weights(state, gram, beta=beta, eps=eps, active=active)

    return from_stateful_weighting(init, weights, "gradvac")
