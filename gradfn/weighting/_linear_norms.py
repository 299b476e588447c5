"""GradNorm's norms at an ``nn.Linear`` without forming any weight gradient.

For ``Y = X Wᵀ (+ b)`` (``X``: ``(N, in)``, ``Y``: ``(N, out)``; the rows of every call of the
layer in the step stacked along ``N``) and ``Δ_k = ∂L_k/∂Y`` (``(N, out)``): ``∇_W L_k = Δ_kᵀ X``
and ``∇_b L_k = Δ_kᵀ 1``, so

``‖∇_{W,b} L_k‖² = ⟨Δ_k Δ_kᵀ, X Xᵀ + 1 1ᵀ⟩`` (``N × N`` Gramians, ``¾ N² out`` per task from the
blocks of ``Δ_k Δ_kᵀ`` on and below its diagonal; ``N² out`` as ``⟨Δ_k, M Δ_k⟩`` when ``N > out``), or
``‖Δ_kᵀ X‖² + ‖Δ_kᵀ 1‖²`` (``N out in`` per task), whichever costs less.

The ``Δ_k`` take ``K`` backward passes that stop at the layer's output (a batched one for a
``(K,)`` loss tensor); :class:`LinearCapture` records ``X`` and ``Y`` with a forward hook.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LinearCapture", "is_plain_linear", "linear_grad_norms"]


def is_plain_linear(layer: object) -> bool:
    """An ``nn.Linear`` (or a subclass that keeps its ``forward``) with real floating weights."""
    return (
        isinstance(layer, nn.Linear)
        and type(layer).forward is nn.Linear.forward
        and layer.weight.is_floating_point()
    )


class LinearCapture:
    """Records the input and output of each call of an ``nn.Linear`` (a forward hook; calls whose
    output does not require grad are skipped) until GradNorm reads them: pass it as GradNorm's
    ``params`` for the norms at the layer's parameters from its output gradients.
    ``WeightedLoss(gradnorm(), K, layer=linear)`` makes one.

    Each read takes the calls recorded since the last one. The exact path (``K``
    ``autograd.grad`` passes to the parameters) serves a read that finds no call, more than
    ``max_calls`` calls or an input changed in place since its call; the first read with calls
    computes both and, when they differ (the weight also reaches the losses other than through
    ``layer(...)``: weight tying, ``F.linear(x, layer.weight)``), warns and keeps the exact path.
    ``remove()`` detaches the hook."""

    def __init__(self, layer: nn.Linear, *, max_calls: int = 16) -> None:
        if not is_plain_linear(layer):
            raise TypeError(
                f"LinearCapture: `layer` must be an nn.Linear, got {type(layer).__name__}"
            )
        if isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 1:
            raise ValueError(f"LinearCapture: `max_calls` must be a positive int, got {max_calls}")
        self.layer = layer
        self.max_calls = max_calls
        self.calls: list[tuple[Tensor, int, Tensor]] = []
        self.overflow = False
        self.checked = False
        self.disabled = False
        self._hook()

    def _hook(self) -> None:
        self._handle = self.layer.register_forward_hook(
            _Recorder(self), prepend=True, with_kwargs=True
        )
        weakref.finalize(self, self._handle.remove)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled and copied without the recorded calls; the copy hooks its own layer."""
        state = dict(self.__dict__, calls=[], overflow=False)
        del state["_handle"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._hook()

    def _record(self, x: Any, y: Any) -> None:
        if not (isinstance(x, Tensor) and isinstance(y, Tensor) and y.requires_grad):
            return
        if self.overflow or len(self.calls) >= self.max_calls:
            self.calls.clear()  # keep no graph alive; this step takes the exact path
            self.overflow = True
            return
        self.calls.append((x, x._version, y))

    def take(self) -> list[tuple[Tensor, Tensor]] | None:
        """The ``(X, Y)`` of the calls since the last read (then forgotten), or None where the
        exact path must serve this read."""
        calls, overflow = self.calls, self.overflow
        self.calls, self.overflow = [], False
        if self.disabled or overflow or not calls:
            return None
        if any(x._version != v for x, v, _ in calls):
            return None
        return [(x, y) for x, _, y in calls]

    def remove(self) -> None:
        """Detach the forward hook and forget the recorded calls."""
        self._handle.remove()
        self.calls = []


class _Recorder:
    """The forward hook: hands each call to its capture while that lives (a weak reference);
    pickled or copied with the layer, it records nothing."""

    def __init__(self, capture: LinearCapture) -> None:
        self.ref: Callable[[], LinearCapture | None] = weakref.ref(capture)

    def __call__(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        capture = self.ref()
        if capture is not None:
            capture._record(args[0] if args else kwargs.get("input"), output)

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.ref = _none


def _none() -> None:
    return None


def _rows(ts: list[Tensor]) -> Tensor:
    """The tensors' rows ``(..., d)`` stacked: ``(N, d)``."""
    flat = [t.reshape(-1, t.shape[-1]) for t in ts]
    return flat[0] if len(flat) == 1 else torch.cat(flat)


def _output_grads(losses: Sequence[Tensor] | Tensor, ys: list[Tensor]) -> Iterator[Tensor | None]:
    """``Δ_k`` task by task, each ``(N, out)`` over the stacked calls (None: no path to the
    layer)."""

    def rows(grads: Sequence[Tensor | None]) -> Tensor | None:
        if all(g is None for g in grads):
            return None
        return _rows(
            [torch.zeros_like(y) if g is None else g for g, y in zip(grads, ys, strict=True)]
        )

    if isinstance(losses, Tensor) and losses.requires_grad:
        k = losses.shape[0]
        eye = torch.eye(k, dtype=losses.dtype, device=losses.device)
        try:
            batched = torch.autograd.grad(
                losses, ys, eye, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
        except RuntimeError:  # an op without a batching rule: one task at a time below
            pass
        else:
            for i in range(k):
                yield rows([None if g is None else g[i] for g in batched])
            return
    for loss in list(losses.unbind(0)) if isinstance(losses, Tensor) else list(losses):
        if not loss.requires_grad:
            yield None
        else:
            yield rows(torch.autograd.grad(loss, ys, retain_graph=True, allow_unused=True))


def linear_grad_norms(
    losses: Sequence[Tensor] | Tensor, layer: nn.Linear, calls: list[tuple[Tensor, Tensor]]
) -> Tensor:
    """``(K,)``: ``‖∇_{W,b} L_k‖`` over the layer's parameters that require grad, from the calls'
    ``(X, Y)`` (module docstring); in the weight's dtype, computed in at least float32. One
    task's ``Δ_k`` at a time (a sequence of losses)."""
    use_w = layer.weight.requires_grad
    use_b = layer.bias is not None and layer.bias.requires_grad
    dtype = torch.promote_types(layer.weight.dtype, torch.float32)
    with torch.no_grad():
        x = _rows([x for x, _ in calls]).to(dtype)
    n, d_in = x.shape
    d_out = layer.weight.shape[0]
    k = len(losses)
    gram_per_task = (0.75 if n <= d_out else 1.0) * n * n * d_out  # _gramian_sq_norm
    if use_w and n * n * d_in + k * gram_per_task < k * n * d_out * d_in:
        sq_norm = _gramian_sq_norm(x, use_b, d_out)
    else:

        def sq_norm(d: Tensor) -> Tensor:  # ‖Δᵀ X‖² + ‖Δᵀ 1‖²
            q = (d.T @ x).pow_(2).sum() if use_w else x.new_zeros(())
            return q + d.sum(0).pow(2).sum() if use_b else q

    sq = []
    for delta in _output_grads(losses, [y for _, y in calls]):
        with torch.no_grad():
            sq.append(x.new_zeros(()) if delta is None else sq_norm(delta.to(dtype)))
    return torch.stack(sq).clamp_min(0).sqrt().to(layer.weight.dtype)


def _gramian_sq_norm(x: Tensor, bias: bool, d_out: int) -> Callable[[Tensor], Tensor]:
    """``Δ ↦ ⟨Δ Δᵀ, M⟩``, ``M = X Xᵀ (+ 1 1ᵀ)``."""
    n = x.shape[0]
    with torch.no_grad():
        m = x @ x.T
        if bias:
            m += 1.0
    if n > d_out:
        return lambda d: (m @ d).mul_(d).sum()
    # from the blocks of Δ Δᵀ on and below the diagonal (halves at h = N/2: 3/4 of the work),
    # the block below standing for its mirror above
    h = n // 2
    left, corner = m[:, :h].clone(), m[h:, h:]
    left[h:] *= 2
    return lambda d: (d @ d[:h].T).mul_(left).sum() + (d[h:] @ d[h:].T).mul_(corner).sum()
