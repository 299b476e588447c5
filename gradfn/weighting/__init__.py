"""Loss weighting (layer 3): methods that weight the ``K`` task losses and cost one backward pass
of ``Σ_k w_k L_k`` (GradNorm: plus ``K`` backward passes down to one chosen layer).

A :class:`LossWeighting` is a pure ``init(tasks) -> state`` and ``update(state, losses,
params=None) -> (state, weights)`` over the ``(K,)`` losses, state first as every gradfn
transform; :func:`weighted_loss` returns the scalar to backpropagate and :class:`WeightedLoss`
holds the state for an ``nn.Module`` loop. Learned weightings (uncertainty, IMTL-L) have a
``(K,)`` parameter the user's optimizer trains (``init_params``) and a penalty.

Methods: dwa, rlw, uncertainty, imtl_l, famo, gradnorm.
"""

from gradfn.weighting._base import LossWeighting, weighted_loss
from gradfn.weighting._dwa import DWAState, dwa, dwa_init, dwa_observe, dwa_weights
from gradfn.weighting._famo import FAMOState, famo, famo_init, famo_update_logits, famo_weights
from gradfn.weighting._gradnorm import GradNormState, gradnorm, gradnorm_init, layer_grad_norms
from gradfn.weighting._imtl_l import imtl_l
from gradfn.weighting._linear_norms import LinearCapture
from gradfn.weighting._module import WeightedLoss
from gradfn.weighting._rlw import RLWState, rlw, rlw_weights
from gradfn.weighting._uncertainty import uncertainty

METHODS: tuple[str, ...] = ("dwa", "rlw", "uncertainty", "imtl_l", "famo", "gradnorm")

__all__ = [
    "METHODS",
    "DWAState",
    "FAMOState",
    "GradNormState",
    "LinearCapture",
    "LossWeighting",
    "RLWState",
    "WeightedLoss",
    "dwa",
    "dwa_init",
    "dwa_observe",
    "dwa_weights",
    "famo",
    "famo_init",
    "famo_update_logits",
    "famo_weights",
    "gradnorm",
    "gradnorm_init",
    "imtl_l",
    "layer_grad_norms",
    "rlw",
    "rlw_weights",
    "uncertainty",
    "weighted_loss",
    "weighting",
]


def weighting(method: str, **hparams: object) -> LossWeighting:
    """The :class:`LossWeighting` of ``method`` (a name in :data:`METHODS`) with ``hparams``."""
    factories = {
        "dwa": dwa,
        "rlw": rlw,
        "uncertainty": uncertainty,
        "imtl_l": imtl_l,
        "famo": famo,
        "gradnorm": gradnorm,
    }
    if not isinstance(method, str) or method not in factories:
        raise ValueError(f"weighting: unknown method {method!r}; expected one of {METHODS}")
    return factories[method](**hparams)  # type: ignore[operator]
