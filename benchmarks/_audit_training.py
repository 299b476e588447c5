"""Audit cases for training: the functional ``songoku`` / ``conductor`` transforms and the
``SonGokuScheduler`` / ``GradientConductor`` adapters — injected NaN steps (the state unchanged, the rest of the run
bit-identical), checkpoint round trips (bit-identical resume) and determinism."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from benchmarks._audit import Case, Wrong
from benchmarks._audit_aggregators import check_finite, tree_equal
from gradfn.adapters import GradientConductor, SonGokuScheduler, TaskSpec
from gradfn.algorithms import conductor, songoku

__all__ = ["NAN", "Net", "training_cases", "xy"]

NAN = float("nan")


def _params(k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(k)
    out = {"w": torch.randn(3, generator=g)}
    out.update({f"h{i}": torch.randn(2, generator=g) for i in range(k)})
    return out


def _loss_fn(k: int) -> Callable[[dict, Any], list[torch.Tensor]]:
    def loss_fn(params: dict, batch: tuple) -> list[torch.Tensor]:
        x, y = batch
        h = torch.tanh(params["w"] * x)
        return [
            ((h[:2] * params[f"h{i}"]).sum() - y[i]) ** 2 + (h * (i + 1)).sum() ** 2 * 0.1
            for i in range(k)
        ]

    return loss_fn


def _batch(k: int, t: int, nan: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + t)
    x, y = torch.randn(3, generator=g), torch.randn(k, generator=g)
    if nan:
        x[0] = NAN
    return x, y


def _songoku(k: int, **cfg: Any) -> Any:
    return songoku(_loss_fn(k), num_tasks=k, refresh_period=2, **cfg)


def _gcond(k: int, **cfg: Any) -> Any:
    return conductor(_loss_fn(k), [1.0] * k, accumulation_steps=2 * k, **cfg)


def _run(
    tx: Any, k: int, steps: range, state: Any, params: dict, gc: bool, nan_at: int = -1
) -> tuple[Any, list]:
    outs = []
    for t in steps:
        batch: Any = _batch(k, t, t == nan_at)
        if gc:
            batch = [_batch(k, 10 * t + i, t == nan_at and i == 1) for i in range(2 * k)]
        state, grads = tx.update(state, params, batch)
        outs.append(grads)
    return state, outs


def _functional_cases(kind: str, k: int, cfg: dict[str, Any]) -> Iterator[Case]:
    gc = kind == "conductor"
    entry = kind
    label = f"K={k} {cfg}"
    make = _gcond if gc else _songoku
    repro = f"# {kind}(loss_fn, num_tasks={k}, **{cfg}).update(...) — "

    def determinism() -> None:
        p = _params(k)
        a = _run(make(k, **cfg), k, range(5), make(k, **cfg).init(p), p, gc)
        b = _run(make(k, **cfg), k, range(5), make(k, **cfg).init(p), p, gc)
        if not tree_equal(a, b):
            raise Wrong("two identical runs differ")
        check_finite("gradients", a[1])

    yield Case(
        entry, f"determinism {label}", determinism, (), repro + "two runs", f"{kind}: determinism"
    )
    for at in (1, 2, 3):

        def nan_step(at: int = at) -> None:
            p, tx = _params(k), make(k, **cfg)
            state, _ = _run(tx, k, range(at), tx.init(p), p, gc)
            new, outs = _run(tx, k, range(at, at + 1), state, p, gc, nan_at=at)
            if not bool(new.skipped):
                raise Wrong("a NaN batch was not skipped")
            if any(bool(v.ne(0).any()) for v in outs[0].values()):
                raise Wrong("a skipped step returned non-zero gradients")
            _, clean = _run(tx, k, range(at + 1, at + 4), state, p, gc)
            _, after = _run(tx, k, range(at + 1, at + 4), new, p, gc)
            if not tree_equal(clean, after):
                raise Wrong("the run after a skipped NaN step differs from a run without it")

        yield Case(
            entry,
            f"NaN step at {at}, {label}",
            nan_step,
            (),
            repro + f"NaN x at step {at}",
            f"{kind}: injected NaN step",
        )


class Net(nn.Module):
    def __init__(self, k: int, bn: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[nn.Module] = (
            [nn.Linear(4, 6)] + ([nn.BatchNorm1d(6)] if bn else []) + [nn.Tanh()]
        )
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(k))

    def forward(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        h = self.trunk(x)
        if k is not None:
            return self.heads[k](h)[:, 0]
        return torch.cat([head(h) for head in self.heads], dim=1)


def xy(t: int, k: int, nan: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + t)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, k, generator=g)
    if nan:
        x[0, 0] = NAN
    return x, y


def _opt(model: nn.Module, name: str) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.01)
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


class _Trainer:
    """One adapter, its model and optimizer; ``step(t, nan)`` trains one step on batch ``t``."""

    def __init__(self, kind: str, k: int, bn: bool, opt: str) -> None:
        self.kind, self.k = kind, k
        self.model, mse = Net(k, bn), nn.functional.mse_loss
        self.opt = _opt(self.model, opt)
        if kind == "SonGokuScheduler":
            tasks = [
                TaskSpec(f"t{i}", lambda m, b, i=i: mse(m(b[0], i), b[1][:, i])) for i in range(k)
            ]
            self.adapter: Any = SonGokuScheduler(self.model, tasks, self.opt, refresh_period=2)
        else:
            fns = {f"t{i}": (lambda out, y, i=i: mse(out[:, i], y[:, i])) for i in range(k)}
            self.adapter = GradientConductor(self.model, fns, {n: 1.0 for n in fns}, k)

    def step(self, t: int, nan: bool = False) -> None:
        if self.kind == "SonGokuScheduler":
            self.adapter.step({f"t{i}": xy(t, self.k, nan) for i in range(self.k)})
            return
        self.opt.zero_grad()
        it = iter([xy(10 * t + i, self.k, nan and i == 0) for i in range(self.k)])
        self.adapter.step(lambda: next(it))
        self.opt.step()

    def snapshot(self) -> dict[str, Any]:
        return {
            "model": copy.deepcopy(self.model.state_dict()),
            "opt": copy.deepcopy(self.opt.state_dict()),
            "adapter": copy.deepcopy(self.adapter.state_dict()),
        }

    def load(self, snap: dict[str, Any]) -> None:
        self.model.load_state_dict(snap["model"])
        self.opt.load_state_dict(snap["opt"])
        self.adapter.load_state_dict(snap["adapter"])


def _adapter_cases(kind: str, k: int, bn: bool, opt: str) -> Iterator[Case]:
    label = f"K={k} batchnorm={bn} {opt}"
    repro = f"# {kind} on a trunk{'+BatchNorm' if bn else ''}-and-{k}-heads net, {opt}: "

    def determinism() -> None:
        runs = []
        for _ in range(2):
            tr = _Trainer(kind, k, bn, opt)
            for t in range(5):
                tr.step(t)
            runs.append(tr.model.state_dict())
        if not tree_equal(dict(runs[0]), dict(runs[1])):
            raise Wrong("two identical runs differ")
        check_finite("parameters", dict(runs[0]))

    yield Case(
        kind, f"determinism {label}", determinism, (), repro + "two runs", f"{kind}: determinism"
    )
    for at in (0, 2):

        def nan_step(at: int = at) -> None:
            clean, dirty = _Trainer(kind, k, bn, opt), _Trainer(kind, k, bn, opt)
            for t in range(5):
                if t == at:
                    before = dirty.model.state_dict()
                    before = {n: v.clone() for n, v in before.items()}
                    dirty.step(t, nan=True)
                    if not tree_equal(before, dict(dirty.model.state_dict())):
                        raise Wrong("a skipped NaN step changed the model (parameters or buffers)")
                clean.step(t)
                dirty.step(t)
            if not tree_equal(dict(clean.model.state_dict()), dict(dirty.model.state_dict())):
                raise Wrong("the run after a skipped NaN step differs from a run without it")

        yield Case(
            kind,
            f"NaN step at {at}, {label}",
            nan_step,
            (),
            repro + f"NaN batch at step {at}",
            f"{kind}: injected NaN step",
        )

    def resume() -> None:
        a = _Trainer(kind, k, bn, opt)
        for t in range(3):
            a.step(t)
        snap = a.snapshot()
        for t in range(3, 6):
            a.step(t)
        b = _Trainer(kind, k, bn, opt)
        b.load(snap)
        for t in range(3, 6):
            b.step(t)
        if not tree_equal(dict(a.model.state_dict()), dict(b.model.state_dict())):
            raise Wrong("a resumed run is not bit-identical")

    yield Case(
        kind,
        f"checkpoint round trip {label}",
        resume,
        (),
        repro + "save at 3, resume",
        f"{kind}: resume",
    )


def training_cases() -> Iterator[Case]:
    for k in (1, 2, 3):
        for mode in ("active", "refresh"):
            for agg in (None, "upgrad", "pcgrad"):
                for sketch in (None, 4):
                    cfg: dict[str, Any] = {
                        "ema_mode": mode,
                        "aggregator": agg,
                        "sketch_dim": sketch,
                    }
                    yield from _functional_cases("songoku", k, cfg)
        for stochastic in (True, False):
            for lion in (False, True):
                for res in ("gramian", "vectors"):
                    cfg = {"stochastic": stochastic, "use_lion": lion, "resolution": res}
                    yield from _functional_cases("conductor", k, cfg)
    for kind in ("SonGokuScheduler", "GradientConductor"):
        for k in (2, 3):
            for bn in (False, True):
                for opt in ("sgd", "adam"):
                    yield from _adapter_cases(kind, k, bn, opt)
