"""Audit cases for the hyper-parameters: ``SonGokuConfig`` and ``ConductorConfig`` fields, and the
``SonGokuScheduler`` / ``GradientConductor`` constructors — non-finite, wrong-typed and numpy
values."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks._audit import Case, Wrong
from benchmarks._audit_training import NAN, Net, xy
from gradfn.adapters import GradientConductor, SonGokuScheduler, TaskSpec
from gradfn.algorithms import ConductorConfig, SonGokuConfig

__all__ = ["config_cases"]

SG_FIELDS = [
    ("num_tasks", 2),
    ("refresh_period", 2),
    ("ema_beta", 0.9),
    ("min_updates_per_cycle", 1),
    ("sketch_dim", 4),
    ("seed", 0),
    ("eps", 1e-12),
]
GC_FIELDS = [
    ("accumulation_steps", 2),
    ("max_iters", 4),
    ("remap_power", 2.0),
    ("norm_cap", 1.0),
    ("norm_ema_beta", 0.95),
    ("momentum_beta", 0.85),
    ("trust_ratio_coef", 1e-4),
    ("trust_ratio_clip", 100.0),
    ("dominance_window", 3),
    ("eps", 1e-8),
    ("norm_floor", 1e-8),
]


def _config_cases(kind: str) -> Iterator[Case]:
    fields = GC_FIELDS if kind == "ConductorConfig" else SG_FIELDS
    base: dict[str, Any] = (
        {"lambdas": (1.0, 1.0), "accumulation_steps": 2}
        if kind == "ConductorConfig"
        else {"num_tasks": 2}
    )
    cls: Any = ConductorConfig if kind == "ConductorConfig" else SonGokuConfig

    for name, default in fields:
        for label, v in (
            ("NaN", NAN),
            ("inf", float("inf")),
            ("-inf", float("-inf")),
            ("str", "x"),
            ("True", True),
        ):

            def rejects(name: str = name, v: Any = v, label: str = label) -> None:
                cls(**{**base, name: v})
                raise Wrong(f"accepted {name}={label}")

            yield Case(
                kind,
                f"{name}={label}",
                rejects,
                (name,),
                f"{kind}(**{base}, {name}={v!r})",
                f"{kind}: non-finite or invalid field",
            )
        npv = np.float64(default) if isinstance(default, float) else np.int64(default)

        def numpy_ok(name: str = name, npv: Any = npv, default: Any = default) -> None:
            a, b = cls(**{**base, name: npv}), cls(**{**base, name: default})
            if a != b:
                raise Wrong(f"numpy {name} gives another config")

        yield Case(
            kind,
            f"{name}=numpy scalar",
            numpy_ok,
            (),
            f"{kind}(**{base}, {name}=np.{type(npv).__name__}({default}))",
            "numpy scalar hyper-parameters",
        )
    if kind == "ConductorConfig":
        for label, v in (
            ("NaN", (NAN, 1.0)),
            ("inf", (float("inf"), 1.0)),
            ("empty", ()),
            ("str", "ab"),
        ):

            def lam(v: Any = v, label: str = label) -> None:
                cls(lambdas=v, accumulation_steps=2)
                raise Wrong(f"accepted lambdas {label}")

            yield Case(
                kind,
                f"lambdas {label}",
                lam,
                ("lambdas",),
                f"ConductorConfig(lambdas={v!r}, accumulation_steps=2)",
                f"{kind}: non-finite or invalid field",
            )
        for label, v in (
            ("NaN", (NAN, -0.5, 0.0)),
            ("decreasing", (0.0, -0.5, -0.8)),
            ("two", (0.0, 0.1)),
        ):

            def thr(v: Any = v, label: str = label) -> None:
                cls(lambdas=(1.0, 1.0), accumulation_steps=2, thresholds=v)
                raise Wrong(f"accepted thresholds {label}")

            yield Case(
                kind,
                f"thresholds {label}",
                thr,
                ("thresholds",),
                f"ConductorConfig(..., thresholds={v!r})",
                f"{kind}: non-finite or invalid field",
            )


def _constructor_cases() -> Iterator[Case]:
    mse = nn.functional.mse_loss
    sg_bad: list[tuple[str, Any, tuple[str, ...]]] = [
        ("refresh_period", NAN, ("refresh_period",)),
        ("refresh_period", 0, ("refresh_period",)),
        ("refresh_period", "x", ("refresh_period",)),
        ("ema_beta", NAN, ("ema_beta",)),
        ("ema_beta", float("inf"), ("ema_beta",)),
        ("eps_cosine", NAN, ("eps_cosine", "eps")),
        ("eps_cosine", float("inf"), ("eps_cosine", "eps")),
        ("min_updates_per_cycle", 0, ("min_updates_per_cycle",)),
        ("quarantine_after", 0, ("quarantine_after",)),
        ("base_method", "bogus", ("base_method",)),
        ("ddp_sync", "bogus", ("ddp_sync",)),
        ("optimizer", "adam", ("optimizer",)),
        ("tasks", [], ("tasks",)),
        ("tasks", "dup", ("tasks", "name", "unique", "duplicate")),
    ]
    for name, v, names in sg_bad:

        def sg(name: str = name, v: Any = v) -> None:
            model = Net(2, False)
            tasks = [
                TaskSpec(f"t{i}", lambda m, b, i=i: mse(m(b[0], i), b[1][:, i])) for i in range(2)
            ]
            kw: dict[str, Any] = {"optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
            if name == "tasks":
                tasks = [] if v == [] else [tasks[0], tasks[0]]
            else:
                kw[name] = v
            SonGokuScheduler(model, tasks, **kw)
            raise Wrong(f"accepted {name}={v!r}")

        yield Case(
            "SonGokuScheduler",
            f"constructor {name}={v!r}",
            sg,
            names,
            f"SonGokuScheduler(model, tasks, opt, {name}={v!r})",
            "SonGokuScheduler: constructor arguments",
        )
    for name, v in (("refresh_period", np.int64(2)), ("ema_beta", np.float64(0.9))):

        def sg_np(name: str = name, v: Any = v) -> None:
            model = Net(2, False)
            tasks = [
                TaskSpec(f"t{i}", lambda m, b, i=i: mse(m(b[0], i), b[1][:, i])) for i in range(2)
            ]
            s = SonGokuScheduler(
                model, tasks, torch.optim.SGD(model.parameters(), lr=0.1), **{name: v}
            )
            s.step({"t0": xy(0, 2), "t1": xy(0, 2)})

        yield Case(
            "SonGokuScheduler",
            f"constructor {name}=numpy scalar",
            sg_np,
            (),
            f"SonGokuScheduler(model, tasks, opt, {name}=np.{type(v).__name__}(...))",
            "numpy scalar hyper-parameters",
        )
    gc_bad: list[tuple[str, Any, tuple[str, ...]]] = [
        ("accumulation_steps", 0, ("accumulation_steps",)),
        ("accumulation_steps", NAN, ("accumulation_steps",)),
        ("accumulation_steps", "x", ("accumulation_steps",)),
        ("lambdas", {"t0": NAN, "t1": 1.0}, ("lambdas",)),
        ("lambdas", {"t0": float("inf"), "t1": 1.0}, ("lambdas",)),
        ("lambdas", {"t0": 1.0}, ("lambdas",)),
        ("lambdas", {"t0": "x", "t1": 1.0}, ("lambdas",)),
        ("momentum_beta", NAN, ("momentum_beta",)),
        ("eps", float("inf"), ("eps",)),
        ("trust_ratio_coef", float("inf"), ("trust_ratio_coef",)),
        ("ddp_sync", "bogus", ("ddp_sync",)),
        ("loss_fns", {}, ("loss_fns",)),
    ]
    for name, v, names in gc_bad:

        def gcb(name: str = name, v: Any = v) -> None:
            fns = {f"t{i}": (lambda out, y, i=i: mse(out[:, i], y[:, i])) for i in range(2)}
            args: dict[str, Any] = {
                "loss_fns": fns,
                "lambdas": {"t0": 1.0, "t1": 1.0},
                "accumulation_steps": 2,
            }
            kw: dict[str, Any] = {}
            if name in args:
                args[name] = v
            else:
                kw[name] = v
            GradientConductor(
                Net(2, False), args["loss_fns"], args["lambdas"], args["accumulation_steps"], **kw
            )
            raise Wrong(f"accepted {name}={v!r}")

        yield Case(
            "GradientConductor",
            f"constructor {name}={v!r}",
            gcb,
            names,
            f"GradientConductor(model, loss_fns, lambdas, 2, {name}={v!r})",
            "GradientConductor: constructor arguments",
        )


def config_cases() -> Iterator[Case]:
    for kind in ("SonGokuConfig", "ConductorConfig"):
        yield from _config_cases(kind)
    yield from _constructor_cases()
