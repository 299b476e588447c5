"""The hyper-parameter tables of the guides (docs/songoku.md, docs/gcond.md) name real arguments
with their real defaults, and every argument of the signatures is documented on its page."""

from __future__ import annotations

import math

import pytest
import torch

from gradfn.adapters import GradientConductor, SonGokuScheduler, TaskSpec
from gradfn.algorithms import conductor, songoku
from tests._utils import ROOT

DOCS = ROOT / "docs"


def _table(page: str, header: str) -> list[list[str]]:
    import re

    text = (DOCS / page).read_text(encoding="utf-8")
    lines = text[text.index(header) :].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def _doc_default(cell: str):
    cell = cell.strip()
    if cell.startswith("`"):  # the first literal: "`None` → `2K`", "`(0.8, 0.2)` (README: …)"
        cell = cell[1:].split("`", 1)[0]
    return eval(cell, {"float32": torch.float32})


def _signature(fn) -> dict:
    """The keyword arguments ``fn`` takes, with their defaults; ``**options`` expanded into the
    config fields it forwards to (the one place each hyper-parameter is defined)."""
    import dataclasses
    import inspect

    from gradfn.algorithms import ConductorConfig, SonGokuConfig
    from gradfn.algorithms._songoku._config import from_reference as songoku_from_reference
    from gradfn.conflict import GraphRule

    def fields(cls, skip=()):
        out = {}
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            default = (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            )
            out[f.name] = inspect.Parameter.empty if default is dataclasses.MISSING else default
        return out

    sig = {k: v.default for k, v in inspect.signature(fn).parameters.items()}
    if sig.pop("options", None) is None:
        return sig
    graph = {f"graph_{k}" if k != "rule" else "graph_rule": v for k, v in fields(GraphRule).items()}
    graph["graph_knn_k"] = graph.pop("graph_knn_k", 3)
    if fn is songoku:
        return {**sig, **fields(SonGokuConfig, skip=("graph",)), **graph}
    if fn is SonGokuScheduler.__init__:
        mapped = set(inspect.signature(songoku_from_reference).parameters) | {
            "eps",
            "per_task_rows",
        }
        return {**sig, **fields(SonGokuConfig, skip=(*mapped, "graph")), **graph}
    reference = {
        k: v.default
        for k, v in inspect.signature(ConductorConfig.from_reference).parameters.items()
        if k not in ("cls", "lambdas", "accumulation_steps", "options", "reference")
    }
    if fn is GradientConductor.__init__:
        mapped = ("lambdas", "accumulation_steps", "stochastic", "thresholds", "rule", "max_iters")
        return {**sig, **reference, **fields(ConductorConfig, skip=mapped)}
    return {**sig, **fields(ConductorConfig, skip=("lambdas",))}


def _same(a, b) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b)
    return a == b and type(a) is type(b)


@pytest.mark.parametrize(
    "page, header, fns",
    [
        ("songoku.md", "| functional (`songoku`)", (songoku, SonGokuScheduler.__init__)),
        ("gcond.md", "| adapter (reference name)", (GradientConductor.__init__, conductor)),
    ],
)
def test_hyper_parameter_tables_match_the_signatures(page, header, fns):
    import re

    sigs = [_signature(f) for f in fns]
    if fns[0] is GradientConductor.__init__:  # None: the reference's or gradfn's (documented)
        sigs[0]["untouched_grad"] = "none"
    problems = []
    for cells in _table(page, header):
        defaults = cells[2].split(" / ") if " / " in cells[2] else [cells[2]] * 2
        for side in (0, 1):
            cell = cells[side]
            names = re.findall(r"`([A-Za-z_][A-Za-z_0-9.]*)`", cell)
            if not names or cell.startswith(("—", "(inside")) or "argument of" in cell:
                continue
            if "**" in cell or "make_reducer" in cell:
                continue
            name, sig = names[0], sigs[side]
            if name.startswith("TaskSpec."):
                name, sig = name.split(".", 1)[1], _signature(TaskSpec)
            if name not in sig:
                problems.append(f"{cell!r} is not an argument of {fns[side].__qualname__}")
                continue
            doc = defaults[side].strip()
            if doc.startswith("—"):
                continue
            want = _doc_default(doc)
            if not _same(sig[name], want):
                problems.append(f"{name}: documented {doc!r}, code {sig[name]!r}")
    # and every argument of the signatures is documented on the page
    text = (DOCS / page).read_text(encoding="utf-8")
    for fn, sig in zip(fns, sigs, strict=True):
        undocumented = [k for k in sig if k not in ("self", "model", "optimizer")]
        problems += [
            f"{fn.__qualname__}({k}) undocumented" for k in undocumented if f"`{k}`" not in text
        ]
    assert not problems, "\n".join(problems)
