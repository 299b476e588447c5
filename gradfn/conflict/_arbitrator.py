"""GCond's arbitrator (arXiv:2509.07252): who wins a conflicting pair, as pure tensor functions.

For a selected pair ``(i, j)`` (``i < j``) the arbitrator names a winner and a loser:

1. **Dominance rotation** (window ``W > 0``): task ``k`` is *dominant* when the last ``W`` recorded
   winners are all ``k``. If exactly one of the pair is dominant, the rule decides: ``"loses"`` (the
   reference's code: the dominant task is forced to lose, a rotation) or ``"wins"`` (the reference's
   README: it automatically wins).
2. Otherwise the **hybrid score** ``score_k = w_stab·max(stability_k, 0) + w_str·strength_k`` with
   ``stability_k = <g_k, p_k> / (||g_k||·||p_k|| + eps)`` (``p_k`` = the task's previous-step
   gradient) and ``strength_k = (||g_k||/(e_k+eps)) / (||g_i||/(e_i+eps) + ||g_j||/(e_j+eps) + eps)``
   (``e_k`` = the task's norm EMA); ``j`` wins iff ``score_j > score_i``, else ``i``.

Everything is worked in the coefficient space of :func:`gradfn.conflict.resolve_gramian`: the current gradients are
``g_k = Σ_m C_km g⁰_m``, so ``<g_k, p_k> = Σ_m C_km X_mk`` with the cross-Gramian
``X_mk = <g⁰_m, p_k>`` (the off-diagonal block of the ``2K×2K`` Gramian of ``[g⁰; p]``).

The winner history is a fixed-size ring: an int64 tensor of shape ``(W,)``, oldest first, ``-1``
for an empty slot (the reference's ``deque(maxlen=W)``). No host syncs anywhere.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "DominanceRule",
    "arbitrate",
    "init_history",
    "is_dominant",
    "push_history",
    "second_wins",
    "stability",
]

DominanceRule = Literal["loses", "wins"]


def init_history(window: int, device: torch.device | str | None = None) -> Tensor:
    """An empty winner history: ``(window,)`` int64 filled with ``-1``."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"init_history: `window` must be an int >= 0, got {window!r}")
    return torch.full((window,), -1, dtype=torch.int64, device=device)


def is_dominant(history: Tensor, task: Tensor) -> Tensor:
    """0-d bool: the history is full and every entry equals ``task`` (always False for ``W = 0``)."""
    if history.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=history.device)
    return (history == task).all()


def push_history(history: Tensor, winner: Tensor, record: Tensor) -> Tensor:
    """Append ``winner`` (dropping the oldest entry) where the 0-d bool ``record`` holds."""
    if history.numel() == 0:
        return history
    shifted = torch.cat([history[1:], winner.reshape(1).to(history.dtype)])
    return torch.where(record, shifted, history)


def stability(
    coefficients: Tensor,
    prev_cross: Tensor | None,
    sq_norms: Tensor,
    prev_sq_norms: Tensor | None,
    eps: float,
) -> Tensor:
    """Cosine of each current gradient with its own previous one, ``(K,)``.

    ``coefficients`` ``C`` (K×K): current ``g_k = Σ_m C_km g⁰_m``; ``prev_cross`` ``X`` (K×K):
    ``X_mk = <g⁰_m, p_k>``; ``sq_norms`` ``||g_k||²`` (K,), ``prev_sq_norms`` ``||p_k||²`` (K,).
    Without a previous gradient (``None``) the stability is 0 (the reference's first step).
    """
    if prev_cross is None or prev_sq_norms is None:
        return torch.zeros_like(sq_norms)
    dots = (coefficients * prev_cross.T).sum(dim=1)  # <g_k, p_k> = Σ_m C_km X_mk
    norms = torch.sqrt(torch.clamp(sq_norms, min=0.0))
    prev_norms = torch.sqrt(torch.clamp(prev_sq_norms, min=0.0))
    return dots / (norms * prev_norms + eps)


def second_wins(
    oh_i: Tensor,
    oh_j: Tensor,
    norms: Tensor,
    norm_ema: Tensor,
    stab: Tensor | None,
    history: Tensor,
    *,
    tie_breaking_weights: tuple[float, float] = (0.8, 0.2),
    dominance: DominanceRule = "loses",
    eps: float = 1e-8,
) -> Tensor:
    """0-d bool: does ``j`` win the pair ``(i, j)``? The pair is given by one-hot vectors (K,).

    Vectorised form of :func:`arbitrate` (no data-dependent indexing): ``norms`` (K,), ``norm_ema``
    (K,), ``stab`` (K,) or ``None`` (no previous gradients: stability 0), ``history`` (W,).
    """
    w_stab, w_str = tie_breaking_weights
    rel = norms / (norm_ema + eps)
    score = w_str * rel / (rel @ oh_i + rel @ oh_j + eps)
    if stab is not None:
        score = score + w_stab * torch.clamp(stab, min=0.0)
    j_wins = score @ oh_j > score @ oh_i  # strict: ties go to i
    if history.numel() == 0:
        return j_wins
    ar = torch.arange(norms.shape[0], device=norms.device)
    dom = (history[None, :] == ar[:, None]).all(1).to(oh_i.dtype)  # dominant tasks (K,)
    dom_i, dom_j = dom @ oh_i, dom @ oh_j
    only_i, only_j = dom_i > dom_j, dom_j > dom_i
    if dominance == "loses":
        return only_i | (~only_j & j_wins)
    if dominance == "wins":
        return only_j | (~only_i & j_wins)
    raise ValueError(f"arbitrate: `dominance` must be 'loses' or 'wins', got {dominance!r}")


def arbitrate(
    i: Tensor,
    j: Tensor,
    norms: Tensor,
    norm_ema: Tensor,
    stab: Tensor | None,
    history: Tensor,
    *,
    tie_breaking_weights: tuple[float, float] = (0.8, 0.2),
    dominance: DominanceRule = "loses",
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    """Winner and loser (0-d int64) of the pair ``(i, j)`` (module docstring).

    ``norms`` (K,) current gradient norms, ``norm_ema`` (K,) the norm EMAs ``e_k``, ``stab`` (K,)
    from :func:`stability` (or ``None``), ``history`` the winner ring. Ties go to ``i``.
    """
    ar = torch.arange(norms.shape[0], device=norms.device)
    oh_i, oh_j = (ar == i).to(norms.dtype), (ar == j).to(norms.dtype)
    j_wins = second_wins(
        oh_i,
        oh_j,
        norms,
        norm_ema,
        stab,
        history,
        tie_breaking_weights=tie_breaking_weights,
        dominance=dominance,
        eps=eps,
    )
    winner = torch.where(j_wins, j, i)
    return winner, i + j - winner
