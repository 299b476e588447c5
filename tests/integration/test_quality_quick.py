"""Smoke test of the quality benchmark (``python -m benchmarks.quality``) on a tiny subset."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.quality import cli  # noqa: E402
from benchmarks.quality.methods import LABELS  # noqa: E402
from benchmarks.quality.runner import edge_f1  # noqa: E402
from benchmarks.quality.toy import FRONT_X2, pareto_front, toy_losses  # noqa: E402

METHODS = ["uniform", "songoku"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    threads = torch.get_num_threads()
    result = cli.main(
        [
            "--quick",
            "--problems=planted_k6",
            f"--methods={','.join(METHODS)}",
            "--steps=12",
            "--refresh-period=4",
            "--toy-steps=4",
            "--seeds=2",
            "--jobs=1",
            "--no-figures",
            f"--out={out}",
        ]
    )
    assert torch.get_num_threads() == threads  # the run restores the thread count
    return out, result


def _finite(x) -> bool:
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite(v) for v in x)
    if isinstance(x, float):
        return math.isfinite(x)
    return True


def test_outputs_exist_and_are_finite(quick_run):
    out, _ = quick_run
    data = json.loads((out / "results.json").read_text())
    records = data["records"]
    assert {(r["method"], r["seed"]) for r in records} == {(m, s) for m in METHODS for s in (0, 1)}
    for r in records:
        assert r["problem"] == "planted_k6" and r["steps"] == 12
        assert _finite(r["metrics"]) and r["metrics"]["mean_rel_mse"] > 0
        assert math.isfinite(r["time_s"]) and r["time_s"] > 0
        assert [c["step"] for c in r["curve"]] == [8, 12]
    sg = [r for r in records if r["method"] == "songoku"]
    # R = 4 over 12 steps: refreshes after steps 4, 8, 12, each scored against the planted graph
    assert all(r["refresh_steps"] == [4, 8, 12] for r in sg)
    assert all(len(r["edge_f1"]) == 3 and all(0 <= f <= 1 for f in r["edge_f1"]) for r in sg)
    kept = next(r for r in sg if r["seed"] == 0)
    assert len(kept["active"]) == 12 and all(len(a) == 6 and any(a) for a in kept["active"])
    assert {t["method"] for t in data["toy"]} == set(METHODS)
    for t in data["toy"]:
        assert len(t["runs"]) == 5 and all(len(run["x"]) == 2 for run in t["runs"])
        assert _finite([run["final_distance"] for run in t["runs"]])


def test_markdown_has_a_row_per_method(quick_run):
    out, _ = quick_run
    text = (out / "results.md").read_text()
    sections = text.split("\n## ")
    for title in ("Headline", "Planted conflict groups, K = 6", "2-task toy"):
        section = next(s for s in sections if s.startswith(title))
        table = next(b for b in section.split("\n\n") if b.startswith("| "))
        rows = table.splitlines()[2:]
        assert all(len(row.split(" | ")) == len(table.splitlines()[0].split(" | ")) for row in rows)
        assert [row.split(" | ")[0][2:] for row in rows] == [LABELS[m] for m in METHODS]
        assert "nan" not in section
    assert not list(out.glob("*.png"))  # --no-figures


QUICK_ARGS = [
    "--quick",
    "--problems=planted_k6",
    "--steps=12",
    "--refresh-period=4",
    "--toy-steps=4",
    "--jobs=1",
    "--no-figures",
]


def test_merge_adds_runs_and_replaces_same_seed(quick_run, tmp_path):
    old_out, _ = quick_run
    out = tmp_path / "merged"
    shutil.copytree(old_out, out)
    old = json.loads((out / "results.json").read_text())
    cli.main(
        [*QUICK_ARGS, "--methods=uniform,gcond_b1zero", "--seeds=1", "--merge", f"--out={out}"]
    )
    data = json.loads((out / "results.json").read_text())
    keys = [(r["method"], r["seed"]) for r in data["records"]]
    assert sorted(keys) == sorted([*((m, s) for m in METHODS for s in (0, 1)), ("gcond_b1zero", 0)])
    # the re-run of uniform seed 0 replaced the old record and reproduced it exactly
    before = next(r for r in old["records"] if (r["method"], r["seed"]) == ("uniform", 0))
    after = next(r for r in data["records"] if (r["method"], r["seed"]) == ("uniform", 0))
    assert after["metrics"] == before["metrics"]
    betas = {r["method"]: r["adam_betas"] for r in data["records"]}
    assert betas == {"uniform": [0.9, 0.999], "songoku": [0.9, 0.999], "gcond_b1zero": [0.0, 0.999]}
    assert sorted(t["method"] for t in data["toy"]) == ["gcond_b1zero", "songoku", "uniform"]
    settings = data["settings"]
    assert settings["methods"] == ["uniform", "gcond_b1zero", "songoku"]
    assert (
        settings["seeds"] == [0, 1] and "gcond_b1zero: betas=(0.0, 0.999)" in settings["optimizer"]
    )
    assert settings["merged runs"][0]["methods"] == ["uniform", "gcond_b1zero"]
    text = (out / "results.md").read_text()
    assert f"| {LABELS['gcond_b1zero']} |" in text


def test_merge_refuses_other_budgets(quick_run, tmp_path):
    old_out, _ = quick_run
    out = tmp_path / "merged"
    shutil.copytree(old_out, out)
    before = (out / "results.json").read_text()
    args = [*QUICK_ARGS, "--methods=uniform", "--seeds=1", "--no-toy", "--merge", f"--out={out}"]
    with pytest.raises(SystemExit, match="budget"):
        cli.main([*args, "--steps=10"])  # later --steps wins
    assert (out / "results.json").read_text() == before
    with pytest.raises(SystemExit, match="no results"):
        cli.main([*args, f"--out={tmp_path / 'empty'}"])


def test_edge_f1_against_a_hand_count():
    truth = torch.tensor([[0, 1, 1], [1, 0, 0], [1, 0, 0]], dtype=torch.bool)
    pred = [[False, True, False], [True, False, True], [False, True, False]]
    # planted edges {01, 02}, predicted {01, 12}: tp 1, fp 1, fn 1 → F1 = 2/4
    assert edge_f1(pred, truth) == 0.5
    assert edge_f1(truth, truth) == 1.0
    assert edge_f1(torch.zeros(3, 3, dtype=torch.bool), torch.zeros(3, 3, dtype=torch.bool)) == 1.0


def _toy_scalar(x1: float, x2: float) -> tuple[float, float]:
    """The CAGrad / Nash-MTL toy written out with ``math`` (f1 scaled by 0.1)."""
    lg1 = math.log(max(abs(0.5 * (-x1 - 7) - math.tanh(-x2)), 5e-6)) + 6
    lg2 = math.log(max(abs(0.5 * (-x1 + 3) + math.tanh(-x2) + 2), 5e-6)) + 6
    c1, c2 = max(math.tanh(x2 / 2), 0.0), max(math.tanh(-x2 / 2), 0.0)
    q1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    q2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    return 0.1 * (lg1 * c1 + q1 * c2), lg2 * c1 + q2 * c2


@pytest.mark.parametrize("x", [(-8.5, 7.5), (0.0, 0.0), (9.0, -1.0), (1.0, FRONT_X2), (3.0, 2.5)])
def test_toy_losses_match_the_formula(x):
    got = toy_losses(torch.tensor(x, dtype=torch.float64)).tolist()
    assert got == pytest.approx(_toy_scalar(*x), rel=1e-12, abs=1e-12)


def test_toy_front_trades_one_loss_for_the_other():
    front = pareto_front(50)
    assert front.shape == (50, 2)
    assert bool((front[1:, 0] < front[:-1, 0]).all()) and bool((front[1:, 1] > front[:-1, 1]).all())


def test_a_quick_run_never_overwrites_the_committed_results(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "DEFAULT_OUT", tmp_path)
    cli.main(["--quick", "--problems=diabetes", "--methods=uniform", "--seeds=1", "--steps=2",
              "--no-toy", "--no-figures", "--jobs=1"])  # fmt: skip
    assert (tmp_path / "quick" / "results.json").is_file()
    assert not (tmp_path / "results.json").exists()
