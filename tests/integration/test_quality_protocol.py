"""The quality benchmark's protocol pieces: untouched SON-GOKU heads, validation splits, the
learning-rate selection, paired intervals, wins/ties/losses and Δm %."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.quality import bracket, cli, graphs, protocol, views  # noqa: E402
from benchmarks.quality.methods import MethodConfig, build_method  # noqa: E402
from benchmarks.quality.problems import build_problem  # noqa: E402
from benchmarks.quality.runner import RunSpec, run_one  # noqa: E402


def test_songoku_stepper_leaves_inactive_heads_without_gradient():
    problem = build_problem("planted_k6", 0)
    stepper = build_method("songoku", problem, 0, MethodConfig(refresh_period=4))
    params = {n: p.clone() for n, p in problem.params.items()}
    opt = torch.optim.Adam(list(params.values()), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    partial = 0
    for _ in range(16):
        before = {n: p.detach().clone() for n, p in params.items()}
        grads = stepper(params, problem.sample(gen))
        active = stepper.trace["active"][-1]
        partial += not all(active)
        for n, p in params.items():
            p.grad = grads[n]
        opt.step()
        for k, on in enumerate(active):
            for leaf in ("weight", "bias"):
                name = f"heads.{k}.{leaf}"
                assert (grads[name] is not None) == on
                assert torch.equal(before[name], params[name]) == (not on)
        assert all(grads[n] is not None for n in params if n.startswith("trunk."))
    assert partial > 0  # the colouring split the tasks at least once


# ---------------------------------------------------------------------------------------------
# validation splits


def test_diabetes_validation_split_is_disjoint_and_redrawn_per_seed():
    a = build_problem("diabetes", 0, n_val=44, split_seed=0)
    b = build_problem("diabetes", 0, n_val=44, split_seed=1)
    old = build_problem("diabetes", 0)
    assert (
        a.notes["n_train"] == old.notes["n_train"] - 44 and a.notes["n_test"] == old.notes["n_test"]
    )
    assert old.validate is None and a.validate is not None
    params = a.params
    va, vb, te = a.validate(params), b.validate(params), a.evaluate(params)
    assert va != vb and va != te  # other samples
    assert (
        a.task_metrics == ["mse_progression", "mse_bmi", "mse_s5"] and a.task_higher == [False] * 3
    )


def test_planted_split_seed_redraws_samples_but_keeps_the_teachers():
    a = build_problem("planted_k6", 0, n_val=50, split_seed=0)
    b = build_problem("planted_k6", 0, n_val=50, split_seed=1)
    old = build_problem("planted_k6", 0)
    # the old problem without a split seed is unchanged: same probe data
    assert torch.equal(old.probe[0], build_problem("planted_k6", 1).probe[0])
    assert not torch.equal(a.probe[0], b.probe[0])
    assert a.planted_adjacency is not None and torch.equal(
        a.planted_adjacency, old.planted_adjacency
    )
    # the same teachers: least squares on each split recovers the same weights (noise aside)
    wa = torch.linalg.lstsq(a.probe[0], a.probe[1]).solution
    wb = torch.linalg.lstsq(b.probe[0], b.probe[1]).solution
    assert torch.allclose(wa, wb, atol=0.15)


# ---------------------------------------------------------------------------------------------
# selection and statistics


def test_lr_grid_is_log_spaced_around_the_base():
    assert protocol.lr_grid(1e-2) == [0.00316, 0.01, 0.0316]
    g = protocol.lr_grid(1e-3, points=5, span=100.0)
    assert g == [1e-4, 0.000316, 1e-3, 0.00316, 1e-2]
    with pytest.raises(ValueError, match="lr_grid"):
        protocol.lr_grid(0.0)


def _rec(method, lr, seed, val, test, problem="p"):
    return {
        "problem": problem,
        "method": method,
        "lr": lr,
        "seed": seed,
        "val_metrics": {"m": val, "a": val, "b": val},
        "metrics": {"m": test, "a": test, "b": 2 * test},
        "select_metric": "m",
        "select_higher": False,
        "headline": "m",
        "higher_is_better": False,
        "task_metrics": ["a", "b"],
        "task_higher": [False, True],
    }


def test_select_uses_validation_not_test():
    records = [_rec("uniform", 0.1, s, val=1.0, test=0.1) for s in (0, 1)] + [
        _rec("uniform", 0.01, s, val=0.5, test=9.0) for s in (0, 1)
    ]
    chosen = protocol.select(records)
    assert [r["lr"] for r in chosen[("p", "uniform")]] == [0.01, 0.01]


def test_paired_interval_against_the_t_table():
    # d = 1, 2, 3: mean 2, sd 1, t_{0.975, 2} = 4.302653 (a t table)
    m, lo, hi = protocol.paired_interval([1.0, 2.0, 3.0])
    half = 4.302653 / math.sqrt(3)
    assert m == 2.0 and lo == pytest.approx(2 - half, rel=1e-6) and hi == pytest.approx(2 + half)


def test_wins_ties_losses_counts_identical_runs_as_ties():
    assert protocol.wins_ties_losses([1.0, 2.0, 0.5, 1.0 + 1e-9], [1.0, 1.0, 1.0, 1.0], False) == (
        1,
        2,
        1,
    )
    assert protocol.wins_ties_losses([2.0], [1.0], True) == (1, 0, 0)


def test_delta_m_by_hand():
    # task a lower-better: (1.1 − 1)/1 = +10 %; task b higher-better: −(0.9 − 0.5)/0.5 = −80 %
    dm, worst = protocol.delta_m({"a": 1.1, "b": 0.9}, {"a": 1.0, "b": 0.5}, [False, True])
    assert dm == pytest.approx(-35.0) and worst == pytest.approx(10.0)


def test_summarize_pairs_seeds_and_single_task_baselines():
    records = []
    for s in (0, 1, 2):
        records += [_rec("uniform", 0.1, s, 1.0, 1.0 + s), _rec("pcgrad", 0.1, s, 1.0, 1.5 + s)]
        records += [_rec("stl_0", 0.1, s, 1.0, 1.0 + s), _rec("stl_1", 0.1, s, 1.0, 1.0 + s)]
    for r in records:
        if r["method"] == "stl_1":
            r["select_metric"], r["select_higher"] = "b", True
    rows = {r["method"]: r for r in protocol.summarize(records)["p"]}
    assert set(rows) == {"uniform", "pcgrad"}
    assert rows["pcgrad"]["vs_uniform"][0] == pytest.approx(0.5) and rows["pcgrad"]["wtl"] == (
        0,
        0,
        3,
    )
    # uniform: a = b_stl → 0 %, b = 2·test vs stl's 2·test → 0 %
    assert rows["uniform"]["delta_m"][0] == pytest.approx(0.0)
    text = protocol.markdown(
        protocol.summarize(records),
        {"seeds": [0, 1, 2], "lr grids": {}, "tie_rel": 1e-6, "headlines": {"p": "m"}},
    )
    assert protocol.SELECTION_RULE in text and "| PCGrad | 0.1 |" in text


def test_conflict_summary_by_hand():
    # probe 1: cos(0,1) = −0.5 (an edge at τ = 0.25), cos(0,2) = 0.1, cos(1,2) = −0.2
    rho1 = [[0.0, 0.5, -0.1], [0.5, 0.0, 0.2], [-0.1, 0.2, 0.0]]
    rho2 = [[0.0, -0.3, -0.3], [-0.3, 0.0, -0.3], [-0.3, -0.3, 0.0]]  # all cos 0.3
    recs = [
        {
            "problem": "a",
            "method": "uniform",
            "probes": [{"step": 0, "rho": rho1}, {"step": 5, "rho": rho2}],
        },
        {"problem": "b", "method": "uniform", "probes": [{"step": 0, "rho": rho2}]},
        {"problem": "a", "method": "pcgrad"},
    ]
    out = protocol.conflict_summary(recs, tau=0.25)
    assert out["a"]["edges_per_probe"] == [1, 0] and not out["a"]["control"]
    assert out["a"]["share_below_minus_tau"] == pytest.approx(1 / 6)
    assert out["a"]["cos_mean"] == pytest.approx((-0.5 + 0.1 - 0.2 + 0.9) / 6)
    assert out["b"]["control"] and out["b"]["cos_median"] == pytest.approx(0.3)


# ---------------------------------------------------------------------------------------------
# the quick protocol run


def test_quick_protocol_run(tmp_path):
    out = cli.main(
        [
            "--protocol",
            "--quick",
            "--problems=diabetes",
            "--methods=uniform,songoku",
            "--steps=6",
            "--refresh-period=2",
            "--seeds=2",
            "--lrs=0.001,0.003",
            "--lr-extend=0",
            "--jobs=1",
            f"--out={tmp_path}",
        ]
    )
    records = out["records"]
    # (uniform, songoku, 3 single-task) × 2 lrs × 2 seeds
    assert len(records) == 5 * 2 * 2
    assert {r["lr"] for r in records} == {0.001, 0.003}
    for r in records:
        assert all(set(c) == {"step", "time", f"val_{r['select_metric']}"} for c in r["curve"])
        assert r["selected_step"] in [c["step"] for c in r["curve"]]
    rows = out["summary"]["diabetes"]
    assert [row["method"] for row in rows] == ["uniform", "songoku"]
    assert "delta_m" in rows[1] and "vs_uniform" in rows[1] and sum(rows[1]["wtl"]) == 2
    conflict = out["settings"]["conflict"]["diabetes"]
    assert conflict["probes"] == 2 * 2 * 5  # every lr and seed, 5 probes each
    text = (tmp_path / "results.md").read_text()
    assert (
        protocol.SELECTION_RULE in text and "nan" not in text and "## Conflict statistics" in text
    )
    assert "Equal wall-clock" in text and "![diabetes: validation curves]" in text
    assert (tmp_path / "validation_curves_diabetes.png").is_file()


def _spec(method, lr, seed):
    return RunSpec(problem="p", method=method, seed=seed, steps=3, lr=lr, eval_every=1)


def test_grid_edges_and_extension_by_hand():
    # validation (lower is better) falls with the lr for uniform: selected 0.1, the top edge;
    # pcgrad is best at 0.01, inside; stl_0 best at 0.001, the bottom edge
    vals = {"uniform": [3.0, 2.0, 1.0], "pcgrad": [2.0, 1.0, 2.0], "stl_0": [1.0, 2.0, 3.0]}
    lrs = [0.001, 0.01, 0.1]
    records = [
        _rec(m, lr, s, val=v, test=v)
        for m, vs in vals.items()
        for lr, v in zip(lrs, vs, strict=True)
        for s in (0, 1)
    ]
    edges = bracket.grid_edges(records)
    assert edges == {("p", "uniform"): "high", ("p", "pcgrad"): None, ("p", "stl_0"): "low"}
    specs = [_spec(m, lr, s) for m in vals for lr in lrs for s in (0, 1)]
    new = bracket.extension_specs(specs, records, {"p": 3}, max_extra=2)
    assert sorted((s.method, s.lr, s.seed) for s in new) == [
        ("stl_0", 0.0001, 0),
        ("stl_0", 0.0001, 1),
        ("uniform", 1.0, 0),
        ("uniform", 1.0, 1),
    ]
    # the cap: a grid with base + max_extra points is not extended further
    assert bracket.extension_specs(specs, records, {"p": 3}, max_extra=0) == []
    rows = {r["method"]: r for r in protocol.summarize(records)["p"]}
    assert rows["uniform"]["grid_edge"] == "high" and rows["pcgrad"]["grid_edge"] is None
    text = protocol.markdown(
        protocol.summarize(records),
        {"seeds": [0, 1], "lr grids": {}, "tie_rel": 1e-6, "headlines": {"p": "m"}},
    )
    assert "| Uniform (sum) | 0.1 (at grid edge ↑) |" in text and "| PCGrad | 0.01 |" in text
    with pytest.raises(ValueError, match="max_extra"):
        bracket.extension_specs(specs, records, {"p": 3}, max_extra=-1)


def test_quick_protocol_extends_a_grid_edge(tmp_path):
    # diabetes at these tiny lrs: the largest lr is best for every method, so every grid grows
    # upwards until the cap (2 + 1 points) and the selection is flagged when still at the edge
    out = cli.main(
        [
            "--protocol",
            "--quick",
            "--problems=diabetes",
            "--methods=uniform",
            "--no-single-task",
            "--steps=4",
            "--seeds=1",
            "--lrs=0.0001,0.0002",
            "--lr-extend=1",
            "--jobs=1",
            f"--out={tmp_path}",
        ]
    )
    assert sorted(r["lr"] for r in out["records"]) == [0.0001, 0.0002, 0.0004]
    row = out["summary"]["diabetes"][0]
    assert row["lr"] == 0.0004 and row["grid_edge"] == "high"
    assert "(at grid edge ↑)" in (tmp_path / "results.md").read_text()


# ---------------------------------------------------------------------------------------------
# SON-GOKU's graph and group recovery, its controls and the refresh-only EMA


def _songoku_record(method):
    spec = RunSpec(
        problem="planted_k6",
        method=method,
        seed=0,
        steps=12,
        lr=0.01,
        eval_every=12,
        method_config=MethodConfig(refresh_period=4),
    )
    return run_one(spec), build_problem("planted_k6", 0).notes["group_of_task"]


def test_oracle_groups_are_the_planted_partition_at_every_refresh():
    rec, part = _songoku_record("songoku_oracle")
    assert len(rec["ari"]) == 3 and rec["ari"] == [1.0, 1.0, 1.0]
    problem = build_problem("planted_k6", 0)
    stepper = build_method("songoku_oracle", problem, 0, MethodConfig(refresh_period=4))
    params = {n: p.clone() for n, p in problem.params.items()}
    gen = torch.Generator().manual_seed(0)
    for _ in range(9):
        stepper(params, problem.sample(gen))
        # every step runs exactly one planted group
        active = stepper.trace["active"][-1]
        assert len({part[k] for k, on in enumerate(active) if on}) == 1
        assert sum(active) == part.count(part[active.index(True)])
    for r in stepper.trace["refresh"]:
        assert r["labels"] == part and r["num_groups"] == max(part) + 1
    with pytest.raises(ValueError, match="planted partition"):
        build_method("songoku_oracle", build_problem("diabetes", 0), 0)


def test_random_groups_keep_songoku_group_sizes_and_change_members():
    from collections import Counter

    from gradfn.conflict import color

    problem = build_problem("planted_k6", 0)
    stepper = build_method("songoku_random", problem, 3, MethodConfig(refresh_period=2))
    params = {n: p.clone() for n, p in problem.params.items()}
    gen = torch.Generator().manual_seed(0)
    for _ in range(16):
        stepper(params, problem.sample(gen))
    same = 0
    for r in stepper.trace["refresh"]:
        own = color(torch.tensor(r["adjacency"])).tolist()  # SON-GOKU's own colouring
        assert sorted(Counter(r["labels"]).values()) == sorted(Counter(own).values())
        same += r["labels"] == own
    assert same < len(stepper.trace["refresh"])  # the members were permuted


def test_songoku_records_exact_graph_f1_and_ari():
    rec, _ = _songoku_record("songoku")
    n = len(rec["refresh_steps"])
    assert n == 3 and len(rec["edge_f1_exact"]) == n and len(rec["ari"]) == n
    assert all(0.0 <= f <= 1.0 for f in rec["edge_f1_exact"])
    assert all(-1.0 <= a <= 1.0 for a in rec["ari"])
    refresh, _ = _songoku_record("songoku_refresh_ema")
    assert refresh["metrics"] != rec["metrics"]  # another EMA, another trajectory


def test_graph_rows_average_over_refreshes_then_seeds():
    runs = [
        {"method": "songoku", "groups": [2, 2], "edge_f1_exact": [0.5, 1.0], "ari": [0.0, 1.0]},
        {"method": "songoku", "groups": [2, 2], "edge_f1_exact": [0.25, 0.25], "ari": [1.0, 1.0]},
    ]
    rows = graphs.graph_rows({("p", "songoku"): runs, ("p", "uniform"): runs})
    (row,) = rows["p"]
    assert row["edge_f1_exact"] == pytest.approx((0.5, 0.625))
    assert row["ari"] == pytest.approx((0.75, 1.0)) and "edge_f1" not in row
    text = "\n".join(graphs.graph_table(rows["p"]))
    assert "| SON-GOKU | 2 | 0.50 (0.62) | – | 0.75 (1.00) |" in text


# ---------------------------------------------------------------------------------------------
# the equal-wall-clock view and the validation curves


def _timed(method, seed, time_s, curve):
    return {
        "problem": "p",
        "method": method,
        "seed": seed,
        "lr": 0.1,
        "time_s": time_s,
        "select_metric": "m",
        "select_higher": False,
        "curve": [{"step": 10 * (i + 1), "time": t, "val_m": v} for i, (t, v) in enumerate(curve)],
    }


def test_equal_time_view_by_hand(tmp_path):
    chosen = {
        ("p", "uniform"): [
            _timed("uniform", 0, 10.0, [(5.0, 2.0), (10.0, 1.0)]),
            _timed("uniform", 1, 20.0, [(10.0, 3.0), (20.0, 2.0)]),
        ],
        # seed 0: best within 10 s is 1.2 (0.5 comes at 12 s); seed 1: 2.5 within 20 s
        ("p", "pcgrad"): [
            _timed("pcgrad", 0, 12.0, [(4.0, 1.5), (8.0, 1.2), (12.0, 0.5)]),
            _timed("pcgrad", 1, 30.0, [(15.0, 2.5), (30.0, 0.1)]),
        ],
        ("p", "stl_0"): [_timed("stl_0", 0, 1.0, [(1.0, 0.0)])],
    }
    rows = {r["method"]: r for r in views.equal_time_rows(chosen)["p"]}
    assert set(rows) == {"uniform", "pcgrad"}
    assert rows["uniform"]["budget_s"] == 15.0 and rows["uniform"]["val"] == 1.5
    assert rows["pcgrad"]["val"] == pytest.approx((1.2 + 2.5) / 2)
    # paired: 1.2 − 1.0 = 0.2 and 2.5 − 2.0 = 0.5
    assert rows["pcgrad"]["vs_uniform"][0] == pytest.approx(0.35)
    assert rows["pcgrad"]["reached"] == 1.0
    text = "\n".join(views.equal_time_table(views.equal_time_rows(chosen)["p"], "m"))
    assert "| PCGrad | 15.0 | 1.8500 |" in text
    assert views.validation_curves(chosen, tmp_path) == ["validation_curves_p.png"]
    assert (tmp_path / "validation_curves_p.png").stat().st_size > 1000
