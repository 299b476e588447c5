"""GradNorm (Chen et al. 2018, *GradNorm: Gradient Normalization for Adaptive Loss Balancing*,
arXiv:1711.02257, Algorithm 1), at one chosen shared layer ``W`` (the paper uses the last shared
layer).

Per step, with weights ``w(t)`` (start at 1, sum ``K``): ``G_k = ‖∇_W w_k L_k‖ = w_k n_k``
(``n_k = ‖∇_W L_k‖``, never a full per-task gradient), ``Ḡ = mean_k G_k``, the inverse
training rates ``L̃_k = L_k(t) / L_k(0)``, ``r_k = L̃_k / mean_j L̃_j`` and ``L_grad = Σ_k |G_k − Ḡ r_k^α|`` with the target ``Ḡ r_k^α`` held
constant (Eq. 2). The step's loss is ``Σ_k w_k(t) L_k``; then ``w`` takes one Adam step (lr
``lr``; the paper leaves the optimizer open) on ``∂L_grad/∂w_k = sign(G_k − Ḡ r_k^α) n_k``, is
floored at ``1e-6`` and renormalised to ``Σ_k w_k = K`` (Adam's moments carry over). Adam makes
the step size independent of the gradient norms' scale, which differs by orders of magnitude
between tasks whose losses do. ``α`` sets
the asymmetry: 0 pulls every ``G_k`` to the same norm, larger values favour slow tasks.
``L(0)`` is the first finite call's losses. ``params`` may also be the shared
representation ``h`` of the step (a non-leaf tensor; LibMTL's ``rep_grad`` mode): the
``autograd.grad`` passes then stop at ``h`` and ``n_k = ‖∂L_k/∂h‖``, much cheaper than a layer's
weights when the heads are small. A non-finite or non-positive loss, or a non-finite gradient
norm, leaves the state as it is (the weights of the step are ``w(t)``).

Which path computes ``n_k`` (:func:`layer_grad_norms`): ``params`` a :class:`LinearCapture` of an
``nn.Linear`` (``WeightedLoss(gradnorm(), K, layer=linear)`` makes one): ``K`` backward passes
that stop at the layer's output ``Y`` (``Δ_k = ∂L_k/∂Y``), then from its input ``X``
``‖∇_{W,b} L_k‖² = ⟨Δ_k Δ_kᵀ, X Xᵀ + 1 1ᵀ⟩`` (``N × N`` Gramians, ``N² out`` per task) or
``‖Δ_kᵀ X‖² + ‖Δ_kᵀ 1‖²`` (``N out in``), whichever costs less; no weight gradient formed. Anything
else (another layer, the layer's parameters as tensors, the features ``h``): one
``autograd.grad`` per task to ``params`` (the exact path). Calls ``autograd.grad`` (eager, not
for ``torch.compile``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from gradfn._internal.checks import check_nonnegative, check_positive
from gradfn.weighting._adam import AdamMoments, adam_step
from gradfn.weighting._base import LossWeighting, check_losses, task_count
from gradfn.weighting._linear_norms import LinearCapture, linear_grad_norms

__all__ = ["GradNormState", "gradnorm", "gradnorm_init", "layer_grad_norms"]

_FLOOR = 1e-6


class GradNormState(NamedTuple):
    """``weights`` ``w(t)`` (``(K,)``, sum ``K``), ``initial`` ``L(0)`` (``(K,)``), ``count``
    (0-d int64, finite steps taken) and the weights' Adam moments."""

    weights: Tensor
    initial: Tensor
    count: Tensor  # type: ignore[assignment]  # a field named like tuple.count
    moments: AdamMoments


def gradnorm_init(
    num_tasks: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> GradNormState:
    """``w = 1``, no initial losses yet."""
    ones = torch.ones(num_tasks, dtype=dtype, device=device)
    i = torch.zeros((), dtype=torch.int64, device=device)
    moments = AdamMoments(torch.zeros_like(ones), torch.zeros_like(ones), i)
    return GradNormState(ones, ones.clone(), i.clone(), moments)


def _layer_params(params: Any) -> list[Tensor]:
    out: list[Tensor]
    if isinstance(params, nn.Module):
        out = [p for p in params.parameters() if p.requires_grad]
    elif isinstance(params, Tensor):
        out = [params]
    elif isinstance(params, dict):
        out = list(params.values())
    elif isinstance(params, Iterable):
        out = list(params)
    else:
        out = []
    if not out or not all(isinstance(p, Tensor) and p.requires_grad for p in out):
        raise TypeError(
            "gradnorm: `params` must be the shared layer (an nn.Module, a tensor or tensors "
            f"that require grad, e.g. the shared features), got {type(params).__name__}"
        )
    return out


def layer_grad_norms(losses: Sequence[Tensor] | Tensor, params: Any) -> Tensor:
    """``(K,)``: ``n_k = ‖∇_W L_k‖`` over the layer's parameters ``W`` (the graph is kept).

    ``params`` a :class:`LinearCapture`: from the layer's output gradients and inputs, no weight
    gradient formed (:mod:`gradfn.weighting._linear_norms`; the exact path below where it cannot
    serve). Else the exact path, ``autograd.grad`` to ``W``: a sequence, one per task, each from
    its own loss; a ``(K,)`` tensor, one batched call (its elements all lead back through every
    task's graph)."""
    if isinstance(params, LinearCapture):
        calls = params.take()
        if calls is None:
            return _exact_norms(losses, params.layer)
        fast = linear_grad_norms(losses, params.layer, calls)
        if not params.checked:
            params.checked = True
            exact = _exact_norms(losses, params.layer)
            rtol = 1e-3 if torch.finfo(exact.dtype).bits >= 32 else 5e-2
            if not torch.allclose(fast, exact, rtol=rtol, atol=rtol * float(exact.abs().max())):
                params.disabled = True
                warnings.warn(
                    "gradnorm: the norms from the layer's calls differ from its parameters' "
                    "gradients (is its weight used other than through layer(...)?); using "
                    "autograd.grad to its parameters from now on",
                    stacklevel=2,
                )
                return exact
        return fast
    return _exact_norms(losses, params)


def _exact_norms(losses: Sequence[Tensor] | Tensor, params: Any) -> Tensor:
    layer = _layer_params(params)
    zero = layer[0].new_zeros(())
    if isinstance(losses, Tensor) and losses.requires_grad:
        eye = torch.eye(losses.shape[0], dtype=losses.dtype, device=losses.device)
        try:
            grads = torch.autograd.grad(
                losses, layer, eye, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
        except RuntimeError:  # an op without a batching rule: one task at a time below
            pass
        else:
            sq = [
                g.detach().flatten(1).pow(2).sum(1).to(zero.dtype) for g in grads if g is not None
            ]
            return torch.stack(sq).sum(0).sqrt() if sq else zero.expand(losses.shape[0])
    items = list(losses.unbind(0)) if isinstance(losses, Tensor) else list(losses)
    norms = []
    for loss in items:
        if not loss.requires_grad:  # a loss that does not reach the layer
            norms.append(zero)
            continue
        grads = torch.autograd.grad(loss, layer, retain_graph=True, allow_unused=True)
        sq = [g.detach().pow(2).sum().to(zero.dtype) for g in grads if g is not None]
        norms.append(torch.stack(sq).sum().sqrt() if sq else zero)
    return torch.stack(norms)


def gradnorm(*, alpha: float = 1.5, lr: float = 0.025) -> LossWeighting:
    """The GradNorm :class:`LossWeighting`; ``update(state, losses, params)``: ``losses`` with
    their graph (a sequence of ``K`` scalars is cheapest), ``params`` the shared layer (an
    ``nn.Module``, its parameters, the features ``h``, or a :class:`LinearCapture` of an
    ``nn.Linear``: the cheapest; module docstring)."""
    alpha = check_nonnegative("alpha", alpha)
    lr = check_positive("lr", lr)

    def init(tasks: int | Tensor, *, device: torch.device | str | None = None) -> GradNormState:
        k, device = task_count(tasks, device)
        return gradnorm_init(k, device=device)

    def update(
        state: GradNormState, losses: Sequence[Tensor] | Tensor, params: Any = None
    ) -> tuple[GradNormState, Tensor]:
        k = state.weights.shape[0]
        values = check_losses(losses, k, "gradnorm").detach().to(state.weights.dtype)
        n = layer_grad_norms(losses, params).to(state.weights.dtype)
        w = state.weights
        ok = bool(torch.isfinite(values).all() & torch.isfinite(n).all() & (values > 0).all())
        if not ok:
            return state, w
        initial = values if int(state.count) == 0 else state.initial
        big_g = w * n
        ratio = values / initial
        r = ratio / ratio.mean()
        target = big_g.mean() * r.pow(alpha)
        stepped, moments = adam_step(w, torch.sign(big_g - target) * n, state.moments, lr=lr)
        new = stepped.clamp_min(_FLOOR)
        new = new * (k / new.sum())
        return GradNormState(new, initial, state.count + 1, moments), w

    return LossWeighting(init, update, "gradnorm")
