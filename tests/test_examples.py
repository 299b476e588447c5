"""Every script in ``examples/`` runs to completion in its quick mode (so none rots).

Each example runs in a fresh interpreter (as a user would run it) with a timeout; the test checks
the exit status and the line the script prints when it has done its job. A new example without an
entry in ``QUICK`` fails :func:`test_every_example_has_a_quick_run`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIMEOUT_S = 240  # generous: a loaded 2-core machine; the quick runs take seconds

# example file -> (arguments of its quick run, text its output must contain)
QUICK: dict[str, tuple[list[str], str]] = {
    "quickstart_songoku.py": (["--steps", "16"], "colour groups:"),
    "quickstart_conductor.py": (["--quick"], "final:"),
    "functional_loop.py": (["--quick"], "upgrad weights of the last step"),
    "compile.py": (["--quick"], "compiled results match eager"),
    "plot_interference.py": (["--quick"], "wrote"),
}
# a second run of the same script: the SON-GOKU branch of the functional loop
EXTRA: list[tuple[str, list[str], str]] = [
    ("functional_loop.py", ["--quick", "--method", "songoku"], "colour groups (task indices)"),
]


def run_example(name: str, args: list[str], tmp_path: Path) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, (
        f"{name} {' '.join(args)} exited with {proc.returncode}\n"
        f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
    return proc.stdout


def test_every_example_has_a_quick_run():
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts, "no example found"
    assert sorted(QUICK) == scripts


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [(n, a, e) for n, (a, e) in QUICK.items() if n != "plot_interference.py"]
    + [(n, a, e) for n, a, e in EXTRA],
    ids=[n for n in QUICK if n != "plot_interference.py"] + [f"{n}-{a[-1]}" for n, a, _ in EXTRA],
)
def test_example_runs(name, args, expected, tmp_path):
    out = run_example(name, args, tmp_path)
    assert expected in out, out


def test_plot_interference_writes_a_png(tmp_path):
    target = tmp_path / "rho.png"
    args, expected = QUICK["plot_interference.py"]
    out = run_example("plot_interference.py", [*args, "--out", str(target)], tmp_path)
    assert expected in out, out
    data = target.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
