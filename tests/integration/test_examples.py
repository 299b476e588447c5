"""Every script in ``examples/`` runs to completion in its quick mode (so none rots).

Each example runs in a fresh interpreter (as a user would run it) with a timeout; the test checks
the exit status and, where ``RUNS`` names one, the line the script prints when it has done its
job. Every example is run with ``--quick``, as docs/getting-started.md documents; one without an
entry in ``RUNS`` is run as ``python examples/<name> --quick``.
``ddp.py`` and ``fsdp.py`` run on two processes (gloo on the CPU) through ``torch.distributed.run``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._utils import ROOT

EXAMPLES = ROOT / "examples"
TIMEOUT_S = 300  # generous: a loaded 2-core machine; the quick runs take seconds
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

# (example file, launcher prefix or None for `python`, arguments, text the output must contain)
RUNS: list[tuple[str, list[str] | None, list[str], str | None]] = [
    ("quickstart_songoku.py", None, ["--quick"], "colour groups:"),
    ("quickstart_conductor.py", None, ["--quick"], "final:"),
    ("functional_loop.py", None, ["--quick"], "upgrad weights of the last step"),
    ("functional_loop.py", None, ["--quick", "--method", "songoku"], "colour groups (task"),
    ("compile.py", None, ["--quick"], "compiled results match eager"),
    ("plot_interference.py", None, ["--quick", "--out", "{tmp}/rho.png"], "wrote"),
    ("tensorboard_songoku.py", None, ["--quick", "--logdir", "{tmp}/tb"], "refreshes; wrote"),
    ("ddp.py", TORCHRUN, ["--quick"], "ranks agree: True"),
    ("fsdp.py", TORCHRUN, ["--quick"], "ranks agree: True"),
    ("amp.py", None, ["--quick"], "amp run finished"),
    ("lightning_multitask.py", None, ["--quick"], "resumed run equals the uninterrupted run: True"),
]


def _scripts() -> list[str]:
    return sorted(p.name for p in EXAMPLES.glob("*.py"))


def _cases() -> list:
    present = set(_scripts())
    cases = [c for c in RUNS if c[0] in present]
    named = {c[0] for c in RUNS}
    cases += [(name, None, ["--quick"], None) for name in sorted(present - named)]
    ids = [
        c[0] if [d[0] for d in cases].count(c[0]) == 1 else f"{c[0]}-{i}"
        for i, c in enumerate(cases)
    ]
    return [pytest.param(*c, id=i) for c, i in zip(cases, ids, strict=True)]


def run_example(
    name: str, launcher: list[str] | None, args: list[str], tmp_path: Path
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env["MPLBACKEND"] = "Agg"
    argv = [*(launcher or [sys.executable]), str(EXAMPLES / name)]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = subprocess.run(
        argv,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, (
        f"{' '.join(argv)} exited with {proc.returncode}\n"
        f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}"
    )
    return proc


def test_every_example_has_a_quick_mode():
    scripts = _scripts()
    assert "quickstart_songoku.py" in scripts and "quickstart_conductor.py" in scripts
    for name in scripts:
        source = (EXAMPLES / name).read_text(encoding="utf-8")
        assert '"--quick"' in source, f"examples/{name} has no --quick mode"
    for name, _, args, _ in RUNS:  # the suite runs each one as documented: with --quick
        assert "--quick" in args, f"RUNS runs examples/{name} without --quick"


def test_quickstart_songoku_shows_every_task_and_the_groups(tmp_path):
    out = run_example("quickstart_songoku.py", None, ["--quick"], tmp_path).stdout
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["step", "a", "b", "c", "d"], out
    rows = [ln.split() for ln in lines[1:] if ln[:4].strip().isdigit()]
    assert [r[0] for r in rows] == ["0", "8", "16", "24", "32"], out
    first, last = rows[0], rows[-1]
    for col in (2, 4):  # b and d train (and fall) while c is kept apart
        assert float(last[col].rstrip("*")) < float(first[col]) - 0.5, out
    assert all(r[-3:] == ["a,b,d", "|", "c"] for r in rows[1:]), out
    assert "colour groups: [['a', 'b', 'd'], ['c']]" in out


@pytest.mark.parametrize(("name", "launcher", "args", "expected"), _cases())
def test_example_runs(name, launcher, args, expected, tmp_path):
    proc = run_example(name, launcher, args, tmp_path)
    if expected is not None:
        assert expected in proc.stdout, proc.stdout
    if name == "plot_interference.py":
        data = (tmp_path / "rho.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
