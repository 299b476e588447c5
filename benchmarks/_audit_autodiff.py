"""Audit cases for :mod:`gradfn.weighting`, ``value_and_per_task_grads`` and
``aggregators.backward``: valid calls against naive loops, bad inputs and hyper-parameters."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

import gradfn.aggregators as A
import gradfn.weighting as W
from benchmarks._audit import Case, Wrong
from benchmarks._audit_aggregators import check_finite
from gradfn.autodiff import value_and_per_task_grads

__all__ = ["autodiff_cases", "weighting_cases"]

W_HPARAMS = {
    "dwa": [("temperature", 2.0)],
    "rlw": [("seed", 0)],
    "uncertainty": [("init", 0.0)],
    "imtl_l": [("init", 0.0)],
    "famo": [("lr", 0.025), ("gamma", 0.01), ("eps", 1e-8)],
    "gradnorm": [("alpha", 1.5), ("lr", 0.025)],
}


def _weights(method: str, k: Any, rows: list[Any], **hp: Any) -> list[torch.Tensor]:
    m = W.weighting(method, **hp)
    state = m.init(k)
    kk = k if isinstance(k, int) else 3
    s = m.init_params(kk) if m.init_params is not None else None
    out = []
    for row in rows:
        losses = torch.tensor(row) if isinstance(row, list) else row
        if method == "gradnorm":  # losses that reach a layer: a tensor of the row's shape
            p = torch.ones(2, requires_grad=True)
            losses, s = losses * p.sum(), {"layer": p}
        state, w = m.update(state, losses, s)
        out.append(w.detach())
    return out


def weighting_cases() -> Iterator[Case]:
    for method in W.METHODS:
        yield from _weighting_method_cases(method)


def _weighting_method_cases(method: str) -> Iterator[Case]:
    if True:  # one method's cases (a function, so that the closures bind this method)
        entry = f"weighting.{method}"

        def case(
            name: str, fn: Callable[[], None], names: tuple[str, ...] = (), cause: str = ""
        ) -> Case:
            return Case(
                entry,
                f"{method}: {name}",
                fn,
                names,
                f"# W.weighting('{method}', **hp): init(K), update(state, losses) — {name}",
                cause or f"weighting {method}: {name}",
            )

        def finite(k: Any, rows: list[Any], **hp: Any) -> Callable[[], None]:
            def run() -> None:
                for w in _weights(method, k, rows, **hp):
                    check_finite("weights", w)

            return run

        def rejects(k: Any, rows: list[Any], what: str, **hp: Any) -> Callable[[], None]:
            def run() -> None:
                _weights(method, k, rows, **hp)
                raise Wrong(f"accepted {what}")

            return run

        for k in (1, 2, 4):
            rows = [[float(1 + i + j) for j in range(k)] for i in range(3)]
            yield case(f"valid K={k}", finite(k, rows))
        yield case("valid losses over 12 orders of magnitude", finite(3, [[1e-6, 1.0, 1e6]] * 3))
        yield case("NaN loss then finite", _nan_then(method))
        yield case("K=0", rejects(0, [[]], "K=0"), ("tasks", "k", "num_tasks", "positive"))
        yield case(
            "wrong number of losses", rejects(3, [[1.0, 2.0]], "2 losses for K=3"), ("losses", "3")
        )
        yield case("2-D losses", rejects(2, [torch.ones(2, 2)], "2-D losses"), ("losses", "shape"))
        yield case("numpy K", finite(np.int64(3), [[1.0, 2.0, 3.0]] * 2), cause="numpy scalars")
        yield case(
            "unknown method",
            rejects(2, [[1.0, 1.0]], "an unknown keyword", bogus=1),
            ("bogus", "unexpected"),
        )
        for name, default in W_HPARAMS[method]:
            for label, v in (("NaN", float("nan")), ("inf", float("inf")), ("str", "x")):
                yield case(
                    f"{name}={label}",
                    rejects(2, [[1.0, 2.0]] * 2, f"{name}={label}", **{name: v}),
                    (name,),
                    cause="weighting: non-finite or invalid hyper-parameter",
                )
            npv = np.float64(default) if isinstance(default, float) else np.int64(default)
            yield case(
                f"{name}=numpy scalar",
                finite(2, [[1.0, 2.0]] * 2, **{name: npv}),
                cause="numpy scalar hyper-parameters",
            )


def _nan_then(method: str) -> Callable[[], None]:
    def run() -> None:
        if method == "gradnorm":
            return
        clean = _weights(method, 2, [[1.0, 2.0], [0.5, 1.5]])
        dirty = _weights(method, 2, [[1.0, 2.0], [float("nan"), 1.0], [0.5, 1.5]])
        check_finite("weights after a NaN loss", dirty)
        if method in ("dwa", "famo") and not torch.equal(clean[-1], dirty[-1]):
            raise Wrong("a NaN loss changed the next weights (state not unchanged)")

    return run


PARAMS = {
    "w": torch.tensor([0.3, -0.7, 1.1]),
    "a": torch.tensor([0.5, 0.2]),
    "b": torch.tensor([-0.6, 0.9]),
}
X = torch.tensor([1.0, -2.0, 0.5])


def _losses(params: dict, x: torch.Tensor) -> list[torch.Tensor]:
    h = torch.tanh(params["w"] * x)
    return [(h[:2] * params["a"]).sum() ** 2, (h[1:] * params["b"]).sum() ** 2, (h**2).sum()]


def _naive(params: dict, x: torch.Tensor) -> dict[str, torch.Tensor]:
    ps = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    rows = []
    for loss in _losses(ps, x):
        gs = torch.autograd.grad(loss, list(ps.values()), allow_unused=True, retain_graph=True)
        rows.append(
            [torch.zeros_like(p) if g is None else g for p, g in zip(ps.values(), gs, strict=True)]
        )
    return {k: torch.stack([r[i] for r in rows]) for i, k in enumerate(ps)}


def autodiff_cases() -> Iterator[Case]:
    e = "value_and_per_task_grads"

    def case(
        name: str, fn: Callable[[], None], names: tuple[str, ...] = (), entry: str = e
    ) -> Case:
        repro = f"# {entry}(loss_fn, params, batch, ...) — {name}"
        return Case(entry, name, fn, names, repro, f"{entry}: {name.split(':')[0]}")

    def matches(
        strategy: str, x: torch.Tensor, loss_fn: Any = _losses, **kw: Any
    ) -> Callable[[], None]:
        def run() -> None:
            _, j = value_and_per_task_grads(loss_fn, PARAMS, x, strategy=strategy, **kw)  # type: ignore[arg-type]
            ref = _naive(PARAMS, x)
            for k in ref:
                if not torch.allclose(j[k], ref[k], rtol=1e-5, atol=1e-6):
                    raise Wrong(f"per-task gradient of {k!r} differs from a naive loop")

        return run

    def rejects(
        what: str, loss_fn: Any = _losses, params: Any = PARAMS, **kw: Any
    ) -> Callable[[], None]:
        def run() -> None:
            value_and_per_task_grads(loss_fn, params, X, **kw)
            raise Wrong(f"accepted {what}")

        return run

    for strategy in ("auto", "vmap", "loop"):
        for s in range(4):
            x = torch.randn(3, generator=torch.Generator().manual_seed(s))
            yield case(f"valid: strategy={strategy} seed {s}", matches(strategy, x))
        yield case(
            f"valid: tuple losses, strategy={strategy}",
            matches(strategy, X, lambda p, x: tuple(_losses(p, x))),
        )
        yield case(
            f"valid: stacked losses, strategy={strategy}",
            matches(strategy, X, lambda p, x: torch.stack(_losses(p, x))),
        )
    yield case(
        "bad: loss_fn not callable", rejects("a non-callable loss_fn", loss_fn=3), ("loss_fn",)
    )
    yield case("bad: strategy name", rejects("strategy='fast'", strategy="fast"), ("strategy",))
    yield case(
        "bad: 2-D losses",
        rejects("(3, 2) losses", loss_fn=lambda p, x: torch.stack(_losses(p, x)).repeat(2, 1).T),
        ("loss", "shape", "scalar"),
    )
    yield case(
        "bad: non-scalar loss in list",
        rejects("a (2,) loss", loss_fn=lambda p, x: [_losses(p, x)[0].repeat(2)]),
        ("loss", "scalar", "shape"),
    )
    yield case(
        "bad: loss_fn returns a str", rejects("a str", loss_fn=lambda p, x: "loss"), ("loss",)
    )
    yield case(
        "bad: params a list of floats", rejects("floats", params=[1.0, 2.0]), ("params", "tensor")
    )
    yield case(
        "bad: num_tasks mismatch",
        rejects("num_tasks=5 for 3 losses", num_tasks=5),
        ("num_tasks", "5"),
    )
    yield case("bad: wrt not callable", rejects("wrt=3", wrt=3), ("wrt",))
    yield case(
        "bad: int params",
        rejects("int64 params", params={"w": torch.ones(3, dtype=torch.int64)}),
        ("params", "dtype", "float", "floating"),
    )
    yield from _backward_cases()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3))


def _backward_cases() -> Iterator[Case]:
    e = "aggregators.backward"
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))

    def case(name: str, fn: Callable[[], None], names: tuple[str, ...] = ()) -> Case:
        return Case(
            e,
            name,
            fn,
            names,
            f"# A.backward(losses, model, method) — {name}",
            f"backward: {name.split(':')[0]}",
        )

    def matches(method: str, form: str) -> Callable[[], None]:
        def run() -> None:
            m = _model()
            out = m(x)
            ls = [out[:, k].pow(2).mean() for k in range(3)]
            params = list(m.parameters())
            rows = [
                torch.cat(
                    [g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)]
                )
                for loss in ls
            ]
            ref = (A.sum_ if method == "sum" else getattr(A, method))(torch.stack(rows)).grad
            given = {
                "list": ls,
                "dict": dict(zip("abc", ls, strict=True)),
                "tensor": torch.stack(ls),
            }[form]
            A.backward(given, m, method)
            got = torch.cat([p.grad.reshape(-1) for p in params])
            if not torch.allclose(got, ref, rtol=1e-4, atol=1e-6):
                raise Wrong(f"p.grad differs from {method} of the naive per-task Jacobian")

        return run

    def rejects(
        what: str,
        make: Callable[[nn.Module], Any],
        method: Any = "mean",
        names: tuple[str, ...] = (),
    ) -> Case:
        def run() -> None:
            m = _model()
            A.backward(make(m), m, method)
            raise Wrong(f"accepted {what}")

        return case(f"bad: {what}", run, names)

    for method in ("mean", "sum", "upgrad", "mgda", "imtl_g", "dualproj"):
        for form in ("list", "dict", "tensor"):
            yield case(f"valid: {method}, losses as a {form}", matches(method, form))
    yield rejects(
        "a (3, 5) loss tensor", lambda m: m(x).T.pow(2), names=("losses", "shape", "scalar")
    )
    yield rejects("an empty list", lambda m: [], names=("losses", "empty", "no loss"))
    yield rejects(
        "a non-scalar loss in a list",
        lambda m: [m(x).pow(2).mean(0)],
        names=("losses", "scalar", "shape"),
    )
    yield rejects("a float loss", lambda m: [1.0, m(x).sum()], names=("losses", "tensor"))

    def constant() -> None:
        m = _model()
        A.backward([torch.ones(()), m(x).sum()], m, "mean")  # task 0 is a constant
        twin = _model()  # the same weights: the reference differentiates its own forward
        ref = torch.autograd.grad(twin(x).sum() / 2, list(twin.parameters()))
        for p, r in zip(m.parameters(), ref, strict=True):
            if p.grad is None or not torch.allclose(p.grad, r, rtol=1e-5, atol=1e-7):
                raise Wrong("a constant loss changed the other task's mean gradient")

    yield case("valid: a constant loss among others", constant)
    yield rejects("unknown method", lambda m: [m(x).sum()], "fastest", ("method", "fastest", "agg"))
    yield rejects("agg=3", lambda m: [m(x).sum()], 3, ("agg",))
