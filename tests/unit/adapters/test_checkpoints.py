"""Review checks across the public API: checkpoints, bad input, non-finite values.

Checkpoints go through ``torch.save`` / ``torch.load(weights_only=True)`` into a FRESH adapter (a new
model instance holding the same weights) and must continue bit-identically; a saved dict must not
change when training goes on.
"""

from __future__ import annotations

import io
import math

import optree
import pytest
import torch
from torch import nn

from gradfn import (
    GradientConductor,
    SonGokuScheduler,
    TaskSpec,
    TauSchedule,
    aggregators,
    conductor,
    songoku,
)

# ---------------------------------------------------------------------------------------------
# tiny models and data


class Trunk3(nn.Module):
    """A shared trunk and three scalar heads; task ``c`` opposes ``a``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(3)])


def _task(k: int, sign: float):
    def loss(m: Trunk3, batch):
        x, y = batch
        return ((m.heads[k](m.trunk(x)).squeeze(-1) - sign * y) ** 2).mean()

    return loss


def specs() -> list[TaskSpec]:
    return [
        TaskSpec("a", _task(0, 1.0)),
        TaskSpec("b", _task(1, 0.5)),
        TaskSpec("c", _task(2, -1.0)),
    ]


def batches(n: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(8, 6, generator=g)
        y = x.sum(dim=1)
        out.append({name: (x, y) for name in "abc"})
    return out


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _tree_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        if a.is_floating_point():  # bit-identical, NaN == NaN (τ is NaN before any refresh)
            return bool(((a == b) | (a.isnan() & b.isnan())).all())
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_tree_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tree_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _clone_tree(a):
    return optree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, a)


# ---------------------------------------------------------------------------------------------
# 3. checkpoints: SonGokuScheduler

SCHED_CONFIGS = {
    "pcgrad-active": dict(base_method="pcgrad", refresh_period=3),
    "refresh-sketch-fmin": dict(
        ema_mode="refresh", sketch_dim=16, min_updates_per_cycle=2, refresh_period=2
    ),
    "legacy-adatask-log": dict(
        legacy_pointer=True,
        base_method="adatask",
        refresh_period=2,
        tau_schedule=TauSchedule("log", 1.0, 0.05, warmup_steps=2, anneal_duration=6),
    ),
}


@pytest.mark.parametrize("name", list(SCHED_CONFIGS))
def test_songoku_scheduler_checkpoint_into_fresh_adapter_is_bit_identical(name):
    kw = {"tau_schedule": TauSchedule("constant", tau_target=-0.2), **SCHED_CONFIGS[name]}
    data = batches(12)

    def build(seed):
        model = Trunk3(seed)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        return model, opt, SonGokuScheduler(model, specs(), opt, **kw)

    model, opt, sched = build(0)
    for b in data[:5]:
        sched.step(b)
    ckpt = _roundtrip({"m": model.state_dict(), "o": opt.state_dict(), "s": sched.state_dict()})
    saved = sched.state_dict()
    frozen = _clone_tree(saved)
    ref_losses = [sched.step(b) for b in data[5:]]
    assert _tree_equal(saved, frozen), "a later step changed a saved state_dict"

    model2, opt2, sched2 = build(7)  # other initial weights: everything must come from the ckpt
    model2.load_state_dict(ckpt["m"])
    opt2.load_state_dict(ckpt["o"])
    sched2.load_state_dict(ckpt["s"])
    loaded = _clone_tree(ckpt["s"])
    new_losses = [sched2.step(b) for b in data[5:]]
    assert _tree_equal(ckpt["s"], loaded), "stepping the loaded adapter changed the loaded dict"
    assert new_losses == ref_losses
    assert sched2.schedule_snapshot() == sched.schedule_snapshot()
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert _tree_equal(sched.state._asdict(), sched2.state._asdict())


# ---------------------------------------------------------------------------------------------
# 3. checkpoints: GradientConductor

GC_LOSSES = {
    "fit": lambda out, y: ((out[:, 0] - y) ** 2).mean(),
    "anti": lambda out, y: ((out[:, 1] + y) ** 2).mean(),
    "mix": lambda out, y: ((out.sum(dim=1) - 0.3 * y) ** 2).mean(),
}
GC_LAMBDAS = {"fit": 1.0, "anti": 0.7, "mix": 0.5}

# the conductor's algorithm state (its statistics describe the last cycle, skipped or not)
ALGORITHM = ("momentum", "prev", "prev_sq_norms", "norm_ema", "history")

GC_CONFIGS = {
    "stochastic-lion": dict(use_lion=True, dominance_window=2),
    "classic-cap-raw": dict(stochastic_accumulation=False, norm_cap=0.5, return_raw_grad=True),
    "reference-zones": dict(reference=True, use_smooth_logic=False, dominance="wins"),
}


def _gc_provider(step: int):
    g = torch.Generator().manual_seed(100 + step)

    def provider():
        x = torch.randn(4, 5, generator=g)
        return x, x[:, 0] - x[:, 1]

    return provider


@pytest.mark.parametrize("name", list(GC_CONFIGS))
def test_gradient_conductor_checkpoint_into_fresh_adapter_is_bit_identical(name):
    kw = GC_CONFIGS[name]

    def build(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, betas=(0.0, 0.99))
        return model, opt, GradientConductor(model, GC_LOSSES, GC_LAMBDAS, 6, **kw)

    def run(model, opt, gc, steps):
        out = []
        for s in steps:
            opt.zero_grad()
            stats = gc.step(_gc_provider(s))
            opt.step()
            out.append(stats)
        return out

    model, opt, gc = build(0)
    run(model, opt, gc, range(3))
    ckpt = _roundtrip({"m": model.state_dict(), "o": opt.state_dict(), "g": gc.state_dict()})
    saved = gc.state_dict()
    frozen = _clone_tree(saved)
    ref = run(model, opt, gc, range(3, 7))
    assert _tree_equal(saved, frozen)

    model2, opt2, gc2 = build(9)
    model2.load_state_dict(ckpt["m"])
    opt2.load_state_dict(ckpt["o"])
    gc2.load_state_dict(ckpt["g"])
    loaded = _clone_tree(ckpt["g"])
    new = run(model2, opt2, gc2, range(3, 7))
    assert _tree_equal(ckpt["g"], loaded)
    assert new == ref
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert _tree_equal(gc.state_dict(), gc2.state_dict())


# ---------------------------------------------------------------------------------------------
# 4. non-finite values never corrupt state


def after_losses(sched) -> torch.Tensor:
    return sched.state.losses


def _poison(batch: dict, task: str, value: float) -> dict:
    x, y = batch[task]
    return {**batch, task: (x, torch.full_like(y, value))}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("mode", ["active", "refresh"])
def test_songoku_scheduler_non_finite_step_is_a_no_op(value, mode):
    data = batches(8)

    def build():
        model = Trunk3(0)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        kw = dict(refresh_period=2, ema_mode=mode, base_method="pcgrad")
        return model, SonGokuScheduler(model, specs(), opt, **kw)

    model_a, sched_a = build()
    for b in data:
        sched_a.step(b)
    model_b, sched_b = build()
    for i, b in enumerate(data):
        if i in (1, 4):  # step 2 would trigger a refresh, step 5 is inside a window
            before = _clone_tree(sched_b.state._asdict())
            params = [p.detach().clone() for p in model_b.parameters()]
            sched_b.step(_poison(b, "abc"[i % 3], value))
            after = sched_b.state._asdict()
            assert bool(after.pop("skipped"))
            before.pop("skipped")
            after.pop("losses")  # the skipped step's losses are recorded (documented)
            assert not bool(torch.isfinite(before.pop("losses") * 0 + after_losses(sched_b)).all())
            assert _tree_equal({k: after[k] for k in before}, before)
            assert all(torch.equal(p, q) for p, q in zip(params, model_b.parameters(), strict=True))
        sched_b.step(b)
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert _tree_equal(sched_a.state._asdict(), sched_b.state._asdict())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_gradient_conductor_non_finite_cycle_is_a_no_op(value):
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, betas=(0.0, 0.99))
        return model, opt, GradientConductor(model, GC_LOSSES, GC_LAMBDAS, 3, use_lion=False)

    def bad_provider():
        x = torch.randn(4, 5)
        return x, torch.full((4,), value)

    model_a, opt_a, gc_a = build()
    for s in range(4):
        opt_a.zero_grad()
        gc_a.step(_gc_provider(s))
        opt_a.step()
    model_b, opt_b, gc_b = build()
    for s in range(4):
        if s == 2:
            before = gc_b.state_dict()["state"]
            opt_b.zero_grad()
            stats = gc_b.step(bad_provider)
            opt_b.step()
            assert stats["skipped"]
            assert all(p.grad is None for p in model_b.parameters())
            after = gc_b.state_dict()["state"]
            # the algorithm state is unchanged; the statistics describe the skipped cycle
            assert _tree_equal(before["inner"]["inner"], after["inner"]["inner"])
            assert not _tree_equal(before["stats"], after["stats"])
        opt_b.zero_grad()
        gc_b.step(_gc_provider(s))
        opt_b.step()
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)
    sa, sb = gc_a.state_dict()["state"], gc_b.state_dict()["state"]
    assert int(sb["inner"].pop("num_skipped")) == 1 and int(sa["inner"].pop("num_skipped")) == 0
    assert _tree_equal(sa, sb)


def _fn_loss(params, batch):
    x, ys = batch
    h = torch.tanh(x @ params["trunk"].T)
    return [((h @ params["heads"][k] - ys[:, k]) ** 2).mean() for k in range(3)]


def _fn_params():
    g = torch.Generator().manual_seed(3)
    return {"trunk": torch.randn(8, 5, generator=g), "heads": torch.randn(3, 8, generator=g)}


def _fn_batch(seed, bad=None, task=1):
    g = torch.Generator().manual_seed(seed)
    x, ys = torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)
    if bad is not None:
        ys[:, task] = bad
    return x, ys


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(ema_mode="refresh"),
        dict(sketch_dim=8, aggregator=aggregators.aggregator("pcgrad", reduction="mean")),
        dict(aggregator="upgrad"),
    ],
)
def test_songoku_functional_non_finite_step_keeps_state(value, kw):
    tx = songoku(_fn_loss, num_tasks=3, shared=["trunk"], refresh_period=2, **kw)
    params = _fn_params()
    state = tx.init(params)
    for t in range(3):
        state, _ = tx.update(state, params, _fn_batch(t))
    for bad_step in range(2):  # one plain step, one that would trigger a refresh
        task = int(torch.nonzero(state.groups[state.group_index])[0])  # an active task's loss
        new, grads = tx.update(state, params, _fn_batch(10 + bad_step, bad=value, task=task))
        assert bool(new.skipped)
        for name, g in grads.items():
            assert torch.equal(g, torch.zeros_like(g)), name
        for key, a in state._asdict().items():
            if key not in ("skipped", "losses"):  # the skipped step's losses are recorded
                assert _tree_equal(a, getattr(new, key)), key
        state, _ = tx.update(state, params, _fn_batch(20 + bad_step))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("stochastic", [True, False])
def test_conductor_functional_non_finite_cycle_keeps_state(value, stochastic):
    tx = conductor(_fn_loss, [1.0, 0.5, 0.25], accumulation_steps=3, stochastic=stochastic)
    params = _fn_params()
    state = tx.init(params)
    for c in range(2):
        state, _ = tx.update(state, params, [_fn_batch(3 * c + i) for i in range(3)])
    mbs = [_fn_batch(50), _fn_batch(51, bad=value), _fn_batch(52)]
    new, grads = tx.update(state, params, mbs)
    assert bool(new.skipped) and int(new.num_skipped) == int(state.num_skipped) + 1
    for name, g in grads.items():
        assert torch.equal(g, torch.zeros_like(g)), name
    for key in ALGORITHM:  # the statistics describe the skipped cycle (documented)
        assert _tree_equal(getattr(state, key), getattr(new, key)), key


@pytest.mark.parametrize("method", ["gradvac", "nash_mtl"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_stateful_aggregators_keep_their_estimates_on_non_finite_input(method, value):
    g = torch.Generator().manual_seed(0)
    agg = aggregators.aggregator(method)
    state = agg.init(3)
    for _ in range(3):
        state, _ = agg.update(state, {"w": torch.randn(3, 7, generator=g)})
    bad = torch.randn(3, 7, generator=g)
    bad[2, 4] = value
    new, out = agg.update(state, {"w": bad})
    assert not bool(torch.isfinite(out.grad["w"]).all())  # never a finite-looking result
    est = "phi" if method == "gradvac" else "alpha"
    assert torch.equal(getattr(new, est), getattr(state, est))
    assert bool(torch.isfinite(getattr(new, est)).all())


# ---------------------------------------------------------------------------------------------
# 1. the hyper-parameter tables of the guides name real arguments with their real defaults

DOCS = __import__("pathlib").Path(__file__).resolve().parents[1] / "docs"


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
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
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
        mapped = set(inspect.signature(songoku_from_reference).parameters) | {"eps", "per_task_rows"}
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


# ---------------------------------------------------------------------------------------------
# 2. bad input is rejected at construction, naming the argument


def _two_losses(p, b):
    return [p["w"].sum() ** 2, (p["w"] - 1).pow(2).sum()]


# gcond forwards its keywords to the resolution: an unknown one fails at the first update
@pytest.mark.parametrize("method", [m for m in aggregators.METHODS if m != "gcond"])
def test_aggregator_rejects_unknown_hyper_parameters_when_built(method):
    # a typo used to pass silently until the first update (inside a training loop)
    with pytest.raises(TypeError, match="reg_esp"):
        aggregators.aggregator(method, reg_esp=1e-4)
    with pytest.raises(TypeError, match="reg_esp"):
        aggregators.as_gradient_transform(method, reg_esp=1e-4)


def test_aggregator_accepts_its_documented_hyper_parameters():
    for method, hp in [
        ("upgrad", {"reg_eps": 1e-4}),
        ("cagrad", {"c": 0.4}),
        ("pcgrad", {"seed": 3}),
        ("graddrop", {"seed": 1}),
        ("gradvac", {"beta": 0.1, "seed": 2}),
        ("nash_mtl", {"max_norm": 0.0}),
        ("mgda", {"solver": "frank_wolfe", "max_iters": 50}),
        ("config", {"rcond": 1e-6}),
        ("gcond", {"thresholds": (-0.9, -0.5, 0.0)}),
    ]:
        agg = aggregators.aggregator(method, **hp)
        _, out = agg.update(agg.init(3), {"w": torch.randn(3, 4)})
        assert out.weights.shape == (3,) or method == "graddrop"


@pytest.mark.parametrize("compile_arg", [3, 1.0, ["inductor"]])
def test_conductor_rejects_a_non_bool_non_str_compile(compile_arg):
    with pytest.raises(TypeError, match="compile"):
        conductor(_two_losses, [1.0, 1.0], accumulation_steps=2, compile=compile_arg)
    with pytest.raises(TypeError, match="compile"):
        GradientConductor(
            nn.Linear(3, 2),
            GC_LOSSES,
            GC_LAMBDAS,
            3,
            stochastic_accumulation=False,
            compile=compile_arg,
        )


@pytest.mark.parametrize("floor", [-1.0, float("nan"), "x"])
def test_conductor_rejects_a_bad_norm_floor(floor):
    with pytest.raises((ValueError, TypeError), match="norm_floor"):
        conductor(_two_losses, [1.0, 1.0], accumulation_steps=2, norm_floor=floor)


@pytest.mark.parametrize("seed", [1.5, "0", None, True])
def test_songoku_rejects_a_non_integer_seed(seed):
    with pytest.raises((ValueError, TypeError), match="seed"):
        songoku(_two_losses, num_tasks=2, seed=seed)


def test_songoku_rejects_an_unknown_strategy_when_built():
    with pytest.raises(ValueError, match="strategy"):
        songoku(_two_losses, num_tasks=2, strategy="vamp")
