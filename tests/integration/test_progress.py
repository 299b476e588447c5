"""The benchmarks' progress bars: they count the work they announce, draw on stderr only when
asked (or when stderr is a terminal), and leave stdout exactly as it is without them."""

import argparse

import pytest
import torch

from benchmarks import _common, _progress
from benchmarks.quality import cli as quality_cli
from benchmarks.quality import runner as quality_runner


@pytest.fixture(autouse=True)
def _default_progress(monkeypatch):
    monkeypatch.setattr(_progress, "_DEFAULT", None)


def test_interleave_counts_every_batch_of_calls(monkeypatch):
    bars = []

    class Spy(_progress.Progress):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(_common, "Progress", Spy)
    calls = {"a": 0, "b": 0, "c": 0}
    runners = {n: (lambda n=n: calls.__setitem__(n, calls[n] + 1)) for n in calls}
    t = _common.interleave(runners, torch.device("cpu"), rounds=4, calls=2, warmup=3)
    (bar,) = bars
    assert bar.total == 3 * (3 + 4) == bar.n  # warm-up calls and timed batches, per runner
    assert calls == {n: 3 + 4 * 2 for n in calls}
    assert all(len(t[n].samples) == 4 for n in calls)
    assert not bar.enabled  # stderr is captured, not a terminal: no bar by default


def test_bar_on_stderr_with_the_total_and_stdout_unchanged(capsys):
    for item in _progress.progress(["x", "y", "z"], "demo", enable=True):
        print(f"row {item}")
    out, err = capsys.readouterr()
    assert out == "row x\nrow y\nrow z\n"
    assert "demo" in err and "3/3" in err


def test_off_when_asked_or_when_stderr_is_not_a_terminal(capsys):
    for enable in (False, None):
        with _progress.Progress(5, "quiet", enable=enable) as bar:
            for _ in range(5):
                bar.update()
            print("result")
        assert bar.n == 5
    out, err = capsys.readouterr()
    assert out == "result\nresult\n" and err == ""
    _progress.set_default(True)  # --progress forces it on, also without a terminal
    assert _progress.enabled() and not _progress.enabled(False)


def test_flags_of_the_benchmarks_and_the_quality_cli(capsys):
    parser = argparse.ArgumentParser()
    _common.add_common_args(parser)
    assert parser.parse_args([]).progress is None
    args = parser.parse_args(["--no-progress"])
    _common.setup(args)
    assert args.progress is False and not _progress.enabled()
    assert quality_cli._parser().parse_args(["--progress"]).progress is True
    assert quality_runner.run_sweep([], progress=True) == []
    assert "quality runs" in capsys.readouterr().err
