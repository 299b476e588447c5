"""The protocol's extra problems: loss scales, persistent planted conflict, overlapping digits
and Multi-Fashion's loader."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.quality.problems import build_problem  # noqa: E402
from benchmarks.quality.problems_extra import multi_fashion  # noqa: E402
from benchmarks.quality.runner import RunSpec, run_one  # noqa: E402


def test_diabetes_scaled_losses_differ_by_orders_of_magnitude():
    problem = build_problem("diabetes_scaled", 0, n_val=44)
    base = build_problem("diabetes", 0, n_val=44)
    x, y = problem.probe
    _, y0 = base.probe
    # the same standardised targets, times 1, 100 and 0.01
    assert torch.allclose(y, y0 * torch.tensor([1.0, 100.0, 0.01]))
    # zero heads predict 0: each loss is the mean square of its target, ×1, ×1e4, ×1e-4
    zero = {
        n: (torch.zeros_like(p) if n.startswith("heads.") else p) for n, p in problem.params.items()
    }
    losses = torch.stack(problem.loss_fn(zero, (x, y)))
    losses0 = torch.stack(base.loss_fn(zero, (x, y0)))
    assert torch.allclose(losses / losses0, torch.tensor([1.0, 1e4, 1e-4]), rtol=1e-4)


def test_planted_fixed_sign_conflict_persists_over_training():
    # every head reads one trunk scalar through a fixed map: no head can undo the opposition
    problem = build_problem("planted_fixed_sign", 0)
    part = problem.notes["group_of_task"]
    assert {n for n in problem.params if n.startswith("heads.")} == {
        f"heads.{k}.bias" for k in range(len(part))
    }
    spec = RunSpec("planted_fixed_sign", "uniform", 0, 120, 1e-2, 120, probe_points=5)
    rec = run_one(spec)
    k = len(part)
    for probe in rec["probes"]:
        rho = probe["rho"]
        cross = [rho[i][j] for i in range(k) for j in range(i + 1, k) if part[i] != part[j]]
        within = [rho[i][j] for i in range(k) for j in range(i + 1, k) if part[i] == part[j]]
        assert all(r > 0.25 for r in cross)  # cos < −τ at every probe, the last included
        assert all(r < -0.25 for r in within)  # aligned within a group
    with pytest.raises(ValueError, match="num_tasks"):
        build_problem("planted_fixed_sign", 0, num_tasks=5)


def test_overlap_digits_canvas_is_two_shifted_digits():
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    images = images.reshape(-1, 8, 8) / 16.0
    problem = build_problem("overlap_digits", 0, n_train=64, n_test=32, n_val=32)
    x, y = problem.sample(torch.Generator().manual_seed(0))
    assert x.shape == (64, 1, 8, 12) and y.shape == (64, 2)
    for i in range(8):
        img = x[i, 0].numpy()
        # columns 0–3 are the left digit alone, 8–11 the right digit alone
        left = images[labels == int(y[i, 0])]
        right = images[labels == int(y[i, 1])]
        assert np.isclose(left[:, :, :4], img[None, :, :4]).all(axis=(1, 2)).any()
        assert np.isclose(right[:, :, 4:], img[None, :, 8:]).all(axis=(1, 2)).any()
    assert set(problem.evaluate(problem.params)) == {"acc_left", "acc_right", "primary_acc"}
    grads = problem.loss_fn(problem.params, (x, y))
    assert len(grads) == 2


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_multi_fashion_reads_idx_files_and_names_the_package_when_absent(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        multi_fashion(0, root=tmp_path)
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("t10k", 12)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    problem = multi_fashion(0, root=tmp_path, n_train=16, n_test=8, n_val=8)
    x, y = problem.sample(torch.Generator().manual_seed(0))
    assert x.shape == (64, 1, 14, 20)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert int(y.max()) <= 9 and problem.validate is not None


def test_protocol_skips_multi_fashion_without_its_data(tmp_path, monkeypatch, capsys):
    from benchmarks.quality import cli, problems_extra

    monkeypatch.setattr(problems_extra, "FASHION_DIR", tmp_path / "absent")
    out = cli.main(
        [
            "--protocol",
            "--quick",
            "--problems=multi_fashion,diabetes_scaled",
            "--methods=uniform",
            "--no-single-task",
            "--steps=2",
            "--seeds=1",
            "--lrs=0.001",
            "--jobs=1",
            f"--out={tmp_path}",
        ]
    )
    printed = capsys.readouterr().out
    assert "skipping multi_fashion" in printed and "dataset-fashion-mnist" in printed
    assert list(out["summary"]) == ["diabetes_scaled"]
