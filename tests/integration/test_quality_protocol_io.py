"""The quality protocol's bookkeeping: the resumable run cache, the overview's verdicts, and
smoke runs kept away from the committed results."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.quality import cli, views  # noqa: E402


def test_resumed_protocol_runs_only_what_is_missing(tmp_path, monkeypatch):
    from benchmarks.quality import run_cache

    argv = [
        "--protocol", "--quick", "--problems=diabetes", "--methods=uniform", "--steps=4",
        "--seeds=2", "--lrs=0.001,0.003", "--lr-extend=0", "--jobs=1", "--no-figures",
        "--no-single-task", f"--out={tmp_path}",
    ]  # fmt: skip
    fresh = cli.main(argv)
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 4
    # a run killed mid-write: its truncated line is ignored and the run is done again
    (tmp_path / "runs.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])
    ran: list[int] = []
    real = run_cache.run_sweep

    def counting(specs, **kwargs):
        ran.append(len(specs))
        return real(specs, **kwargs)

    monkeypatch.setattr(run_cache, "run_sweep", counting)
    resumed = cli.main([*argv, "--resume"])
    assert ran == [1]
    assert resumed["summary"] == fresh["summary"]
    assert resumed["records"][:3] == fresh["records"][:3]  # read back, timings included
    assert resumed["records"][3]["metrics"] == fresh["records"][3]["metrics"]  # run again
    # the committed compressed copy seeds a checkout that has no runs.jsonl
    from benchmarks.quality.run_cache import RunCache

    RunCache(tmp_path / "runs.jsonl", resume=True).compress()
    (tmp_path / "runs.jsonl").unlink()
    ran.clear()
    assert cli.main([*argv, "--resume"])["summary"] == fresh["summary"]
    assert ran == [0]
    # without --resume the file starts again and every run is done
    ran.clear()
    cli.main(argv)
    assert ran == [4]


# ---------------------------------------------------------------------------------------------
# the learning-rate grid brackets the optimum


def test_overview_verdicts_by_hand():
    lower = {"higher": False, "wtl": (1, 0, 4)}
    assert views.verdict({**lower, "vs_uniform": (0.2, 0.1, 0.3)}) == "worse"  # mse went up
    assert views.verdict({**lower, "vs_uniform": (-0.2, -0.3, -0.1)}) == "better"
    assert views.verdict({**lower, "vs_uniform": (0.1, -0.1, 0.3)}) == "≈"
    higher = {"higher": True, "wtl": (4, 0, 1)}
    assert views.verdict({**higher, "vs_uniform": (0.2, 0.1, 0.3)}) == "better"
    assert views.verdict({**higher, "vs_uniform": (0.0, 0.0, 0.0), "wtl": (0, 5, 0)}) == "tie"
    assert views.verdict({"method": "uniform"}) == "–"
    rows = {
        "a": [{"method": "uniform", "higher": True}, {"method": "pcgrad", **higher,
              "vs_uniform": (0.2, 0.1, 0.3), "delta_m": (-1.25, -2.0, -0.5)}],
        "b": [{"method": "uniform", "higher": False}],
    }  # fmt: skip
    text = "\n".join(views.overview_table(rows, {"b": {"control": True}}))
    assert "| Method | a | b (control) |" in text
    assert "| PCGrad | better, Δm -1.2 % | – |" in text


def test_a_quick_run_never_overwrites_the_committed_results(tmp_path, monkeypatch):
    from benchmarks.quality import protocol_run

    monkeypatch.setattr(protocol_run, "PROTOCOL_OUT", tmp_path)
    argv = ["--protocol", "--problems=diabetes", "--methods=uniform", "--steps=4", "--seeds=2",
            "--lrs=0.001", "--lr-extend=0", "--jobs=1", "--no-figures", "--no-single-task"]  # fmt: skip
    cli.main([*argv, "--quick"])
    assert (tmp_path / "quick" / "results.md").is_file()
    assert not (tmp_path / "results.md").exists() and not (tmp_path / "runs.jsonl.gz").exists()
    cli.main(argv)  # the full protocol writes to its own folder
    assert (tmp_path / "results.md").is_file() and (tmp_path / "runs.jsonl.gz").is_file()
