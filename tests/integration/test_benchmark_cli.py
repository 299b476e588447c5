"""Every speed benchmark takes ``--threads`` (default 1), ``--device`` and ``--[no-]progress``, and ``benchmarks/gpu.sh``
runs each of them; a device that is not there is a clear message, not a traceback."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SPEED = [
    "per_task_grads",
    "backward",
    "aggregators",
    "weighting",
    "songoku",
    "conductor",
    "compile",
]


def _help(name: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("name", SPEED)
def test_every_speed_benchmark_takes_threads_and_device(name):
    text = _help(name)
    assert "--device" in text and "--no-progress" in text
    assert re.search(r"--threads.*default: 1", text.replace("\n", " "))


def test_gpu_script_runs_every_speed_benchmark_on_cuda():
    script = (ROOT / "benchmarks" / "gpu.sh").read_text()
    listed = set(re.findall(r"for name in ([\w ]+);", script)[0].split()) | {"compile"}
    assert listed == set(SPEED)
    assert "--device cuda" in script


def test_a_device_that_is_not_there_is_a_clear_message():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.songoku", "--device", "cuda:99", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "--device" in done.stderr and "CUDA device" in done.stderr
    assert "Traceback" not in done.stderr
