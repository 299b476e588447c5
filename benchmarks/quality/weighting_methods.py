"""The loss-weighting baselines of the evaluation (:mod:`gradfn.weighting`) and FairGrad.

* **DWA, RLW, FAMO**: one forward, weights from the losses, ONE backward of ``Σ_k w_k L_k``.
* **Uncertainty, IMTL-L** (learned weights): the ``(K,)`` parameter ``s`` takes one step of its
  own Adam (lr :data:`LEARNED_LR`, or ``MethodConfig.extra["weighting_lr"]``) per optimizer step,
  on the gradient of ``Σ_k w_k(s) L_k + penalty(s)``, which also gives the model's gradient.
* **GradNorm** (α = 1.5, the paper's value for its regression tasks): the norms at the last shared
  layer's weight, then one backward of ``Σ_k w_k L_k``.
* **FairGrad** (α = 1): an aggregator over the per-task trunk gradients, as the other aggregators.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import gradfn.weighting as W

__all__ = ["LEARNED_LR", "WEIGHTING_LABELS", "WEIGHTING_METHODS", "weighting_stepper"]

WEIGHTING_LABELS: dict[str, str] = {
    "dwa": "DWA",
    "rlw": "RLW",
    "uncertainty": "Uncertainty weighting",
    "imtl_l": "IMTL-L",
    "famo": "FAMO",
    "gradnorm": "GradNorm",
    "fairgrad": "FairGrad",
}
WEIGHTING_METHODS: tuple[str, ...] = tuple(WEIGHTING_LABELS)
LEARNED_LR = 1e-2
_HPARAMS: dict[str, dict[str, Any]] = {"gradnorm": {"alpha": 1.5}}


def _last_shared_weight(problem: Any, params: dict[str, Tensor]) -> str:
    names = [n for n in params if problem.shared(n) and n.endswith("weight")]
    if not names:
        raise ValueError("gradnorm: the problem has no shared weight")
    return names[-1]


def weighting_stepper(problem: Any, method: str, seed: int, extra: dict[str, Any]) -> Callable:
    """``fn(params, batch) -> grads`` of a loss weighting (``method`` in
    :data:`WEIGHTING_METHODS`, not ``fairgrad``: that one is an aggregator)."""
    hparams = dict(_HPARAMS.get(method, {}))
    if method == "rlw":
        hparams["seed"] = seed
    lw = W.weighting(method, **hparams)
    k = problem.num_tasks
    box: dict[str, Any] = {"state": lw.init(k)}
    s: Tensor | None = None
    opt: torch.optim.Optimizer | None = None
    if lw.init_params is not None:
        s = lw.init_params(k).detach().requires_grad_(True)
        opt = torch.optim.Adam([s], lr=float(extra.get("weighting_lr", LEARNED_LR)))

    def fn(params: dict[str, Tensor], batch: Any) -> dict[str, Tensor | None]:
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        with torch.enable_grad():
            losses = list(problem.loss_fn(leaves, batch))
            arg: Any = s
            if method == "gradnorm":
                arg = [leaves[_last_shared_weight(problem, leaves)]]
            box["state"], total, _ = W.weighted_loss(lw, box["state"], losses, arg)
            wrt = list(leaves.values()) + ([s] if s is not None else [])
            grads = torch.autograd.grad(total, wrt, allow_unused=True)
        if s is not None and opt is not None:
            s.grad = grads[-1]
            opt.step()
        return {
            n: torch.zeros_like(x) if g is None else g
            for (n, x), g in zip(leaves.items(), grads, strict=False)
        }

    return fn
