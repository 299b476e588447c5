"""Per-feature torch floors: an older torch (``torch.__version__`` patched) fails at once with a
message naming the feature and the minimum; a new enough one passes; the README's "Supported
versions" table, the getting-started page and ``pyproject.toml`` state the same floors."""

from __future__ import annotations

import re

import optree
import pytest
import torch

from gradfn._internal.compat import OPTREE_FLOORS, TORCH_FLOORS, require_torch, torch_version
from gradfn.adapters import GradientConductor, SonGokuScheduler, TaskSpec
from gradfn.algorithms import conductor
from tests._utils import ROOT
from tests._utils.models import TrunkHeads


def _loss(params, batch):
    return [(params["w"] * batch).sum() ** 2, (params["w"] - batch).square().sum()]


def _scheduler(**kw):
    model = TrunkHeads(4, 8, 2, seed=0)
    tasks = [TaskSpec(f"t{k}", lambda m, b, k=k: m(b)[:, k].square().mean()) for k in range(2)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return SonGokuScheduler(model, tasks, opt, refresh_period=2, tau_schedule=None, **kw)


def _gcond(**kw):
    model = TrunkHeads(4, 8, 2, seed=0)
    losses = {f"t{k}": (lambda out, y, k=k: out[:, k].square().mean()) for k in range(2)}
    return GradientConductor(model, losses, {"t0": 1.0, "t1": 1.0}, 2, **kw)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2.1.2+cu121", (2, 1, 2)),
        ("2.10.0a0+git1234abc", (2, 10, 0)),
        ("2.3", (2, 3, 0)),
        ("2.13.0+cpu", (2, 13, 0)),
    ],
)
def test_torch_version_parses_release_local_and_prerelease_tags(text, expected):
    assert torch_version(text) == expected


def test_versions_compare_as_numbers_not_strings():
    # "2.10" < "2.9" as strings: the floor of compile would wrongly reject 2.10
    assert torch_version("2.10.0") > torch_version("2.9.1")
    assert torch_version() >= torch_version(TORCH_FLOORS["compile"])  # what CI runs


def test_torch_version_rejects_text_without_major_minor():
    with pytest.raises(ValueError, match="version"):
        torch_version("nightly")


@pytest.mark.parametrize(
    ("installed", "fails"), [("2.2.2", True), ("2.3.0", False), ("2.13.0", False)]
)
def test_require_torch_names_feature_minimum_and_installed_version(monkeypatch, installed, fails):
    monkeypatch.setattr(torch, "__version__", installed)
    if not fails:
        require_torch("2.3", feature="a feature")
        return
    with pytest.raises(RuntimeError) as err:
        require_torch("2.3", feature="a feature", hint="do this instead")
    msg = str(err.value)
    assert "a feature needs torch >= 2.3" in msg
    assert "torch 2.2.2 is installed" in msg
    assert msg.endswith("; do this instead")


@pytest.mark.parametrize("compile", [True, "aot_eager"])
def test_conductor_compile_needs_its_floor(monkeypatch, compile):
    monkeypatch.setattr(torch, "__version__", "2.8.0")
    with pytest.raises(RuntimeError, match=rf"compile={compile!r} needs torch >= 2\.10.*2\.8\.0"):
        conductor(_loss, [1.0, 1.0], accumulation_steps=2, compile=compile)
    with pytest.raises(RuntimeError, match=r"compile=True needs torch >= 2\.10"):
        _gcond(compile=True)
    conductor(_loss, [1.0, 1.0], accumulation_steps=2, compile=False)  # eager: no floor
    _gcond()

    monkeypatch.setattr(torch, "__version__", "2.10.0")
    tx = conductor(_loss, [1.0, 1.0], accumulation_steps=2, compile=compile)
    assert tx.process is not None

    # below optree 0.13 torch's dynamo cannot trace optree's tree functions, on any torch
    monkeypatch.setattr(optree, "__version__", "0.12.1")
    with pytest.raises(RuntimeError, match=r"needs optree >= 0\.13, but optree 0\.12\.1"):
        conductor(_loss, [1.0, 1.0], accumulation_steps=2, compile=compile)
    conductor(_loss, [1.0, 1.0], accumulation_steps=2)  # eager: optree 0.11 is enough


@pytest.mark.parametrize(
    "build", [_scheduler, _gcond], ids=["SonGokuScheduler", "GradientConductor"]
)
def test_adapter_scaler_needs_its_floor(monkeypatch, build):
    scaler = torch.amp.GradScaler("cpu")
    name = "SonGokuScheduler" if build is _scheduler else "GradientConductor"
    monkeypatch.setattr(torch, "__version__", "2.2.2")
    with pytest.raises(
        RuntimeError, match=rf"{name}\(scaler=\.\.\.\) needs torch >= 2\.3.*2\.2\.2"
    ):
        build(scaler=scaler)
    build()  # no scaler: no floor
    assert build(scaler=torch.amp.GradScaler("cpu", enabled=False)).scaler is None  # a no-op one

    monkeypatch.setattr(torch, "__version__", "2.3.0")
    assert build(scaler=scaler).scaler is scaler


# ---------------------------------------------------------------- the documented table


def _table(page: str) -> list[str]:
    text = (ROOT / page).read_text(encoding="utf-8")
    lines = text[text.index("## Supported versions") :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start + 2 : end]  # the rows, after the header and the |---| line


def _row(rows: list[str], first_cell: str) -> str:
    (row,) = [r for r in rows if r.split("|")[1].strip().startswith(first_cell)]
    return row


def _pyproject_floor(name: str) -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    if name == "python":
        return re.search(r'requires-python = ">=([\d.]+)"', text).group(1)
    floors = set(re.findall(rf'"{re.escape(name)}(?:\[[\w,-]+\])?>=([\d.]+)"', text))
    assert len(floors) == 1, (name, floors)  # every extra names the same floor
    return floors.pop()


def test_readme_and_getting_started_show_the_same_table():
    assert _table("README.md") == _table("docs/getting-started.md")


def test_the_table_states_the_floors_the_code_and_pyproject_enforce():
    rows = _table("README.md")
    assert _pyproject_floor("torch") == TORCH_FLOORS["library"]
    assert f"torch ≥ {TORCH_FLOORS['library']}" in _row(rows, "the eager library")
    assert f"torch ≥ {TORCH_FLOORS['scaler']}" in _row(rows, "`scaler=`")
    compile_row = _row(rows, "`torch.compile")
    assert (
        f"torch ≥ {TORCH_FLOORS['compile']} and optree ≥ {OPTREE_FLOORS['compile']}" in compile_row
    )
    assert f"≥ {_pyproject_floor('python')}" in _row(rows, "Python")
    assert _pyproject_floor("optree") == OPTREE_FLOORS["library"]
    assert f"optree ≥ {OPTREE_FLOORS['library']}" in _row(rows, "optree")
    tools = _row(rows, "test tools")
    for name in ("pytest", "hypothesis", "networkx", "scikit-learn", "matplotlib", "torchjd"):
        assert f"{name} ≥ {_pyproject_floor(name)}" in tools, name
