"""Audit cases for :mod:`gradfn.aggregators`: every method of the registry, through
``aggregator(name)`` and through its function, on valid, rank-deficient and bad inputs and
hyper-parameters; TorchJD (when installed) is the oracle where it has the method."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

import gradfn.aggregators as A
from benchmarks._audit import Case, Wrong

__all__ = ["aggregator_cases", "check_finite", "tree_equal"]

# the numeric hyper-parameters perturbed per method (name, default)
HPARAMS: dict[str, list[tuple[str, Any]]] = {
    "mgda": [("iters", 20), ("reg_eps", 1e-10), ("epsilon", 1e-3), ("max_iters", 100)],
    "upgrad": [("norm_eps", 0.0), ("reg_eps", 1e-4), ("iters", 20)],
    "dualproj": [("norm_eps", 0.0), ("reg_eps", 1e-4), ("iters", 20)],
    "cagrad": [("c", 0.5), ("stationary_eps", 1e-4), ("iters", 10), ("reg_eps", 1e-10)],
    "config": [("rcond", 1e-6)],
    "fairgrad": [("alpha", 1.0), ("iters", 30)],
    "pcgrad": [("seed", 0)],
    "graddrop": [("seed", 0), ("leak", 0.0)],
    "gradvac": [("beta", 0.5), ("eps", 1e-8)],
    "nash_mtl": [("max_norm", 1.0), ("update_weights_every", 1), ("iters", 20)],
    "inverse_norm": [("beta", 0.9)],
    "gcond": [("thresholds", (-0.8, -0.5, 0.0))],
}
# TorchJD's counterpart (deterministic ones only)
TORCHJD: dict[str, tuple[str, dict[str, Any]]] = {
    "mean": ("Mean", {}),
    "sum": ("Sum", {}),
    "mgda": ("MGDA", {}),
    "upgrad": ("UPGrad", {}),
    "dualproj": ("DualProj", {}),
    "imtl_g": ("IMTLG", {}),
    "aligned_mtl": ("AlignedMTL", {}),
    "config": ("ConFIG", {}),
    "cagrad": ("CAGrad", {"c": 0.5}),
}
FUNCS = {"sum": A.sum_}
STATELESS = (
    "mean",
    "sum",
    "mgda",
    "upgrad",
    "dualproj",
    "cagrad",
    "imtl_g",
    "aligned_mtl",
    "config",
    "gcond",
    "fairgrad",
    "pcgrad",
    "graddrop",
)


def tree_equal(a: Any, b: Any) -> bool:
    """Bit-identical pytrees of tensors (NaN equal to NaN)."""
    import optree

    la, ta = optree.tree_flatten(a, none_is_leaf=True)
    lb, tb = optree.tree_flatten(b, none_is_leaf=True)
    if ta != tb:
        return False
    for x, y in zip(la, lb, strict=True):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if (
                x.shape != y.shape
                or x.dtype != y.dtype
                or not torch.equal(
                    torch.nan_to_num(x.detach(), 7.0), torch.nan_to_num(y.detach(), 7.0)
                )
            ):
                return False
        elif x != y and not (isinstance(x, float) and math.isnan(x) and math.isnan(y)):
            return False
    return True


def check_finite(what: str, tree: Any) -> None:
    import optree

    for leaf in optree.tree_leaves(tree):
        finite = not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point()
        if not finite and not bool(torch.isfinite(leaf).all()):
            raise Wrong(f"non-finite {what} from finite input")


def _rand(k: int, n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(k, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(
        dtype
    )


def _call(
    method: str, via: str, grads: Any, *, call_kw: dict | None = None, **hp: Any
) -> A.Aggregated:
    """``hp``: hyper-parameters; ``call_kw``: ``active`` / ``gram`` of the call itself."""
    if via == "aggregator":
        agg = A.aggregator(method, **hp)
        state = agg.init(_k(grads))
        _, out = agg.update(state, grads, **(call_kw or {}))
        return out
    fn = FUNCS.get(method) or getattr(A, method)
    return fn(grads, **hp, **(call_kw or {}))


def _k(grads: Any) -> int:
    """The task count to ``init`` with (3 when ``grads`` has none: the update is the test)."""
    leaf = next(iter(grads.values())) if isinstance(grads, dict) and grads else grads
    shape = getattr(leaf, "shape", ())
    return int(shape[0]) if len(shape) else 3


def _torchjd(method: str, j: torch.Tensor) -> torch.Tensor | None:
    """TorchJD's aggregation of ``j``; for MGDA the exact min-norm point (SLSQP in float64)
    instead, since TorchJD's Frank-Wolfe MGDA stops ~10 % away from it."""
    if method == "mgda":
        return _min_norm_point(j)
    try:
        import torchjd.aggregation as tjd
    except ImportError:
        return None
    name, kw = TORCHJD[method]
    return getattr(tjd, name)(**kw)(j)


def _min_norm_point(j: torch.Tensor) -> torch.Tensor | None:
    try:
        import scipy.optimize as so
    except ImportError:
        return None
    g = (j.double() @ j.double().T).numpy()
    k = g.shape[0]
    res = so.minimize(
        lambda w: w @ g @ w,
        np.ones(k) / k,
        jac=lambda w: 2 * g @ w,
        bounds=[(0, None)] * k,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return torch.from_numpy(res.x) @ j.double()


def _valid(
    method: str, via: str, grads: Any, finite: bool = True, jd: bool = False
) -> Callable[[], None]:
    def run() -> None:
        out = _call(method, via, grads)
        if finite:
            check_finite("aggregated gradient", out.grad)
        if jd and method in TORCHJD and isinstance(grads, torch.Tensor):
            ref = _torchjd(method, grads)
            if ref is None:
                return
            ours = out.grad
            floor = 1e-3 * float(grads.double().norm(dim=1).max())  # a zero answer's noise
            dev = float(
                (ours.double() - ref.double()).norm() / max(float(ref.double().norm()), floor)
            )
            if not dev < 0.1:
                who = (
                    "the exact min-norm point"
                    if method == "mgda"
                    else f"TorchJD {TORCHJD[method][0]}"
                )
                raise Wrong(f"deviates from {who} by {dev:.3g} (relative)")

    return run


def _twice(method: str, via: str, grads: Any) -> Callable[[], None]:
    def run() -> None:
        if not tree_equal(_call(method, via, grads), _call(method, via, grads)):
            raise Wrong("two identical calls differ")

    return run


def _accepts_not(
    method: str, via: str, grads: Any, what: str, hp: dict | None = None
) -> Callable[[], None]:
    """Invalid input: raising (clearly) is right; returning is wrong (``what``)."""

    def run() -> None:
        _call(method, via, grads, **(hp or {}))
        raise Wrong(f"accepted {what}")

    return run


def _may_accept(
    method: str, via: str, grads: Any, hp: dict | None = None, call_kw: dict | None = None
) -> Callable[[], None]:
    """Input that may be rejected or accepted; accepted, it must give a finite result."""

    def run() -> None:
        check_finite(
            "aggregated gradient", _call(method, via, grads, call_kw=call_kw, **(hp or {})).grad
        )

    return run


def _rejects_call(
    method: str, via: str, grads: Any, call_kw: dict, what: str
) -> Callable[[], None]:
    def run() -> None:
        _call(method, via, grads, call_kw=call_kw)
        raise Wrong(f"accepted {what}")

    return run


def _numpy_same(method: str, via: str, grads: Any, name: str, value: Any) -> Callable[[], None]:
    def run() -> None:
        ref = _call(method, via, grads, **{name: value})
        npv = np.float64(value) if isinstance(value, float) else np.int64(value)
        if not tree_equal(_call(method, via, grads, **{name: npv}).grad, ref.grad):
            raise Wrong(f"numpy {name} gives another result than the Python number")

    return run


def _rank_deficient(seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    g = _rand(3, 6, seed)
    yield "K=8>n=4", _rand(8, 4, seed)
    yield "duplicate row", torch.stack([g[0], g[1], g[0]])
    yield "g2=g0+g1", torch.stack([g[0], g[1], g[0] + g[1]])
    yield "near-duplicate (1e-7)", torch.stack([g[0], g[0] + 1e-7 * g[1], g[2]])
    yield "a zero row", torch.stack([g[0], torch.zeros_like(g[0]), g[2]])
    yield "K=6 rank 2", (_rand(6, 2, seed) @ _rand(2, 10, seed + 1))


def _method_cases(method: str, via: str) -> Iterator[Case]:
    entry = "aggregators.aggregator" if via == "aggregator" else f"aggregators.{method}"
    call = (
        f"A.aggregator('{method}', **hp).update(state, g)"
        if via == "aggregator"
        else f"A.{method}(g, **hp)"
    )
    R = f"# {call}; "

    def case(
        name: str, fn: Callable[[], None], names: tuple[str, ...] = (), cause: str = ""
    ) -> Case:
        return Case(
            entry,
            f"{method}: {name}",
            fn,
            names,
            f"{R}{method}, {name}",
            cause or f"{method}: {name.split(' ')[0]}",
        )

    for k in (1, 2, 3, 5):
        for n in (4, 10):
            j, deficient = _rand(k, n, 10 * k + n), k > n
            name = f"{'rank-deficient' if deficient else 'valid'} K={k} n={n}"
            cause = f"{method}: rank-deficient float32 gradients" if deficient else ""
            yield case(name, _valid(method, via, j, jd=k > 1), cause=cause)
    yield case("valid float64", _valid(method, via, _rand(3, 5, 1, torch.float64), jd=True))
    tree = {"a": _rand(3, 4, 2), "b": _rand(3, 6, 3).reshape(3, 2, 3)}
    yield case("valid pytree of two leaves", _valid(method, via, tree))
    yield case("valid (K,) leaf: a scalar parameter", _valid(method, via, _rand(3, 1, 4)[:, 0]))
    yield case("determinism", _twice(method, via, _rand(4, 7, 5)))
    for seed in (0, 1):
        for label, j in _rank_deficient(seed):
            yield case(
                f"rank-deficient {label} seed {seed}",
                _valid(method, via, j, jd=True),
                cause=f"{method}: rank-deficient float32 gradients",
            )
    g = _rand(3, 5, 7)
    bad_grads: list[tuple[str, Any, tuple[str, ...]]] = [
        ("numpy array", g.numpy(), ("grads", "tensor")),
        ("0-d tensor", g[0, 0], ("grads", "dim", "shape")),
        ("K=0", g[:0], ("grads", "task", "empty", "k ")),
        ("int64 tensor", g.to(torch.int64), ("grads", "dtype", "float")),
        ("string", "grads", ("grads",)),
        ("None", None, ("grads",)),
        ("leaves with different K", {"a": g, "b": g[:2]}, ("grads", "task", "leading", "rows")),
    ]
    for label, bad, names in bad_grads:
        yield case(
            f"bad grads: {label}",
            _accepts_not(method, via, bad, label),
            names,
            cause=f"bad grads: {label}",
        )
    nan, inf = g.clone(), g.clone()
    nan[1, 2], inf[0, 0] = float("nan"), float("inf")
    yield case("NaN entry", _may_accept_any(method, via, nan), ("grads", "finite", "nan"))
    yield case("inf entry", _may_accept_any(method, via, inf), ("grads", "finite", "inf"))
    yield case("n=0", _may_accept(method, via, g[:, :0]), ("grads", "empty", "size"))
    yield case("bfloat16", _may_accept(method, via, g.to(torch.bfloat16)), ("grads", "dtype"))
    gram = g.double() @ g.double().T
    call_bad: list[tuple[str, dict, tuple[str, ...]]] = [
        ("active of K+1 entries", {"active": torch.ones(4, dtype=torch.bool)}, ("active", "shape")),
        ("active as floats", {"active": torch.ones(3)}, ("active", "bool", "dtype")),
        ("gram of the wrong shape", {"gram": torch.eye(4)}, ("gram", "shape")),
        ("gram not a tensor", {"gram": gram.tolist()}, ("gram", "tensor")),
    ]
    if method not in ("gradvac", "nash_mtl", "inverse_norm", "graddrop", "mean", "sum"):
        for label, kw, names in call_bad:
            yield case(
                f"bad call: {label}",
                _rejects_call(method, via, g, kw, label),
                names,
                cause=f"bad call argument: {label}",
            )
        yield case(
            "valid: float64 gram with float32 grads",
            _may_accept(method, via, g, call_kw={"gram": gram}),
            ("gram", "dtype"),
        )
        yield case(
            "valid: one task inactive",
            _may_accept(method, via, g, call_kw={"active": torch.tensor([True, False, True])}),
        )
    yield case(
        "unknown hyper-parameter",
        _accepts_not(method, via, g, "an unknown keyword", {"bogus": 1}),
        ("bogus",),
        cause="unknown hyper-parameter",
    )
    for name, default in HPARAMS.get(method, []):
        if name == "thresholds":
            for label, v in (("NaN", (float("nan"), -0.5, 0.0)), ("decreasing", (0.0, -0.5, -0.8))):
                yield case(
                    f"thresholds {label}",
                    _accepts_not(method, via, g, f"thresholds {label}", {name: v}),
                    (name,),
                    cause=f"{method}: non-finite or invalid hyper-parameter",
                )
            continue
        for label, v in (("NaN", float("nan")), ("inf", float("inf")), ("str", "x")):
            yield case(
                f"{name}={label}",
                _accepts_not(method, via, g, f"{name}={label}", {name: v}),
                (name,),
                cause=f"{method}: non-finite or invalid hyper-parameter",
            )
        yield case(
            f"{name}=-1",
            _may_accept(method, via, g, {name: -1 if isinstance(default, int) else -1.0}),
            (name,),
            cause=f"{method}: negative hyper-parameter",
        )
        yield case(
            f"{name}=numpy scalar",
            _numpy_same(method, via, g, name, default),
            cause="numpy scalar hyper-parameters",
        )


def _may_accept_any(method: str, via: str, grads: Any) -> Callable[[], None]:
    def run() -> None:
        _call(method, via, grads)

    return run


def aggregator_cases() -> Iterator[Case]:
    """Every method through ``aggregator(name)``, and the stateless ones through the function."""
    for method in A.METHODS:
        yield from _method_cases(method, "aggregator")
        if method in STATELESS:
            yield from _method_cases(method, "function")
