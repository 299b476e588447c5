"""Aggregators: values against TorchJD and scipy oracles, by-hand 2×2 cases, TorchJD-style
properties (hypothesis), masks, edge cases and the adapters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchjd.aggregation as tjd
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import minimize
from torchjd._linalg import DualConeProjector, normalize, regularize

import gradfn.aggregators as A

F64 = torch.float64


def _jac(seed: int, k: int, n: int, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    j = torch.randn(k, n, generator=g, dtype=dtype)
    if k >= 2:  # plant a conflict
        j[1] = -0.7 * j[0] + 0.3 * j[1]
    return j


def _split(j: torch.Tensor) -> dict[str, torch.Tensor]:
    """A two-leaf task-stacked pytree holding the rows of ``j``."""
    k, n = j.shape
    cut = n // 2
    return {"a": j[:, :cut].reshape(k, cut), "b": j[:, cut:]}


def _flat(tree: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tree["a"].reshape(-1), tree["b"].reshape(-1)])


# --------------------------------------------------------------------------------------------
# oracles


class ScipyProjector(DualConeProjector):
    """TorchJD's dual-cone projection with scipy's L-BFGS-B in place of quadprog."""

    def __init__(self, norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> None:
        self.norm_eps, self.reg_eps = norm_eps, reg_eps

    def __call__(self, u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        gm = regularize(normalize(g, self.norm_eps), self.reg_eps).double().numpy()
        out = []
        for row in u.reshape(-1, gm.shape[0]).double().numpy():
            res = minimize(
                lambda v: v @ gm @ v,
                row.copy(),
                jac=lambda v: 2 * gm @ v,
                bounds=[(x, None) for x in row],
                method="L-BFGS-B",
                options={"ftol": 1e-16, "gtol": 1e-13, "maxiter": 10000},
            )
            out.append(res.x)
        return torch.tensor(np.array(out), dtype=g.dtype).reshape(u.shape)


def cagrad_oracle(g: torch.Tensor, c: float) -> np.ndarray:
    """CAGrad's dual on the trace-normalised Gramian with scipy SLSQP (as the reference code)."""
    gn = (g / g.trace()).numpy()
    k = gn.shape[0]
    b = np.ones(k) / k
    sphi = c * math.sqrt(b @ gn @ b)

    def f(w):
        return w @ gn @ b + sphi * math.sqrt(max(w @ gn @ w, 0.0))

    res = minimize(
        f,
        b,
        bounds=[(0, 1)] * k,
        method="SLSQP",
        constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    w = res.x
    return b + sphi / math.sqrt(w @ gn @ w) * w


def nash_oracle(g: torch.Tensor) -> np.ndarray:
    """The bargaining solution ``α ⊙ Gα = 1`` as the minimiser of ``½αᵀGα − Σ log α``."""
    gm = g.numpy()
    k = gm.shape[0]
    res = minimize(
        lambda a: 0.5 * a @ gm @ a - np.log(a).sum(),
        np.ones(k),
        jac=lambda a: gm @ a - 1 / a,
        bounds=[(1e-12, None)] * k,
        method="L-BFGS-B",
        options={"ftol": 1e-16, "gtol": 1e-13, "maxiter": 20000},
    )
    return res.x


CASES = [(0, 2, 6), (1, 3, 10), (2, 5, 20), (3, 6, 4), (4, 8, 40)]  # (seed, K, n); (3,6,4): rank 4


# --------------------------------------------------------------------------------------------
# values against TorchJD (float64, tolerance 1e-9 relative unless stated)


def _close(mine: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-9) -> None:
    scale = max(float(ref.abs().max()), 1e-12)
    assert float((mine - ref).abs().max()) <= rtol * scale + 1e-12, (mine, ref)


@pytest.mark.parametrize("case", CASES)
def test_values_match_torchjd_closed_form(case):
    seed, k, n = case
    j = _jac(seed, k, n)
    grads = _split(j)
    _close(_flat(A.mean(grads).grad), tjd.Mean()(j))
    _close(_flat(A.sum_(grads).grad), tjd.Sum()(j))
    _close(_flat(A.imtl_g(grads).grad), tjd.IMTLG()(j), 1e-7)
    for mode in ("min", "median", "rmse"):
        _close(
            _flat(A.aligned_mtl(grads, scale_mode=mode).grad),
            tjd.AlignedMTL(scale_mode=mode)(j),
            1e-7,
        )
    _close(_flat(A.config(grads).grad), tjd.ConFIG()(j), 1e-7)
    _close(_flat(A.mgda(grads, solver="frank_wolfe").grad), tjd.MGDA()(j))


@pytest.mark.parametrize("case", CASES)
def test_values_match_torchjd_random_methods(case):
    seed, k, n = case
    j = _jac(seed, k, n)
    grads = _split(j)
    torch.manual_seed(seed)
    order = torch.stack([torch.randperm(k) for _ in range(k)])
    torch.manual_seed(seed)
    _close(_flat(A.pcgrad(grads, order=order).grad), tjd.PCGrad()(j))
    torch.manual_seed(seed)
    noise = torch.rand(n, dtype=F64)
    torch.manual_seed(seed)
    ref = tjd.GradDrop()(j)
    out = A.graddrop(grads, noise={"a": noise[: n // 2], "b": noise[n // 2 :]})
    _close(_flat(out.grad), ref)
    _close(_flat({x: r.sum(0) for x, r in out.rows.items()}), ref)


@pytest.mark.parametrize("case", CASES)
def test_gradvac_matches_torchjd_over_steps(case):
    seed, k, n = case
    ref_agg = tjd.GradVac(beta=0.3)
    state = A.gradvac_init(k)
    for step in range(3):
        j = _jac(seed * 10 + step, k, n)
        torch.manual_seed(step)
        orders = []
        for i in range(k):
            others = [x for x in range(k) if x != i]
            orders.append([others[p] for p in torch.randperm(k - 1).tolist()])
        torch.manual_seed(step)
        ref = ref_agg(j)
        order = torch.tensor(orders, dtype=torch.int64).reshape(k, k - 1)
        state, w = A.gradvac_weights(state, j @ j.T, beta=0.3, order=order)
        _close(w @ j, ref)


@pytest.mark.parametrize("case", CASES)
def test_qp_methods_match_torchjd_with_exact_projector(case):
    seed, k, n = case
    j = _jac(seed, k, n)
    grads = _split(j)
    up = A.upgrad(grads, norm_eps=1e-4).grad
    dp = A.dualproj(grads, norm_eps=1e-4).grad
    _close(_flat(up), tjd.UPGrad(projector=ScipyProjector())(j), 1e-6)
    _close(_flat(dp), tjd.DualProj(projector=ScipyProjector())(j), 1e-6)


@pytest.mark.parametrize("case", CASES)
def test_mgda_exact_is_at_least_as_good_as_torchjd(case):
    seed, k, n = case
    j = _jac(seed, k, n)
    g = j @ j.T
    w = A.mgda_weights(g)
    ref = tjd.MGDAWeighting(epsilon=1e-9, max_iters=3000)(g)
    assert float(w.sum()) == pytest.approx(1.0) and bool((w >= 0).all())
    assert float(w @ g @ w) <= float(ref @ g @ ref) + 1e-9 * float(g.trace())


@pytest.mark.parametrize("case", CASES)
def test_cagrad_matches_scipy(case):
    seed, k, n = case
    j = _jac(seed, k, n)
    g = j @ j.T
    for c in (0.25, 0.5, 0.9):
        np.testing.assert_allclose(A.cagrad_weights(g, c=c).numpy(), cagrad_oracle(g, c), atol=1e-5)


@pytest.mark.parametrize("case", [c for c in CASES if c[2] >= c[1]])
def test_nash_mtl_matches_scipy(case):
    seed, k, n = case
    j = _jac(seed, k, n)
    g = j @ j.T
    alpha = A.nash_mtl_solve(g)
    np.testing.assert_allclose(alpha.numpy(), nash_oracle(g), rtol=1e-5)
    torch.testing.assert_close(alpha * (g @ alpha), torch.ones(k, dtype=F64))


def test_nash_mtl_state_reuse_and_clipping():
    agg = A.aggregator("nash_mtl", max_norm=0.5, update_weights_every=2)
    j1, j2 = _jac(0, 3, 8), _jac(1, 3, 8)
    state = agg.init(3)
    state, out1 = agg.update(state, {"w": j1})
    alpha1 = A.nash_mtl_solve(j1 @ j1.T)
    torch.testing.assert_close(state.alpha, alpha1)
    state, out2 = agg.update(state, {"w": j2})  # reuses alpha1, clipped on j2
    d = alpha1 @ j2
    expected = d * min(1.0, 0.5 / float(d.norm()))
    torch.testing.assert_close(out2.grad["w"], expected)
    assert int(state.step) == 2
    assert float(out1.grad["w"].norm()) <= 0.5 + 1e-12


# --------------------------------------------------------------------------------------------
# by-hand 2×2 values: g1 = (1, 0), g2 = (-1, 1) (conflicting) unless stated

G1, G2 = [1.0, 0.0], [-1.0, 1.0]
R2 = math.sqrt(2.0)


@pytest.mark.parametrize(
    ("method", "kwargs", "expected"),
    [
        ("mean", {}, [0.0, 0.5]),
        ("sum", {}, [0.0, 1.0]),
        ("pcgrad", {}, [0.5, 1.5]),  # g1' = (.5,.5), g2' = (0,1), any order
        ("gradvac", {}, [0.5, 1.5]),  # first step, zero targets: same corrections as PCGrad
        ("mgda", {}, [0.2, 0.4]),  # w = (0.6, 0.4)
        ("upgrad", {"reg_eps": 0.0}, [0.25, 0.75]),  # (.25,.25) + (0,.5)
        ("dualproj", {"reg_eps": 0.0}, [0.0, 0.5]),  # the mean is already in the dual cone
        ("imtl_g", {}, [1 / (3 + 2 * R2), (1 + R2) / (3 + 2 * R2)]),
        ("config", {}, [(1 + R2) / (4 + 2 * R2), (1 + R2) ** 2 / (4 + 2 * R2)]),
    ],
)
def test_by_hand_2x2(method, kwargs, expected):
    grads = {"w": torch.tensor([G1, G2], dtype=F64)}
    agg = A.aggregator(method, **kwargs)
    _, out = agg.update(agg.init(2), grads)
    torch.testing.assert_close(out.grad["w"], torch.tensor(expected, dtype=F64))


def test_by_hand_2x2_orthogonal():
    grads = {"w": torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64)}
    # Nash: α_i = 1/‖g_i‖ → (1, 1); clipped to norm 1
    _, out = A.aggregator("nash_mtl", max_norm=0.0).update(A.nash_mtl_init(2), grads)
    torch.testing.assert_close(out.grad["w"], torch.tensor([1.0, 1.0], dtype=F64))
    _, out = A.aggregator("nash_mtl").update(A.nash_mtl_init(2), grads)
    torch.testing.assert_close(out.grad["w"], torch.tensor([1.0, 1.0], dtype=F64) / R2)
    # Aligned-MTL: B = diag(1, 1/2) on λ = (1, 4) → w = (1/2, 1/4)
    torch.testing.assert_close(A.aligned_mtl(grads).weights, torch.tensor([0.5, 0.25], dtype=F64))
    # CAGrad on G = I: w = (1/2 + c/2)·1
    eye = torch.eye(2, dtype=F64)
    torch.testing.assert_close(A.cagrad_weights(eye, c=0.5), torch.tensor([0.75, 0.75], dtype=F64))


def test_by_hand_graddrop():
    grads = {"w": torch.tensor([[1.0, -2.0], [-3.0, -1.0]], dtype=F64)}
    # P = (0.25, 0); with U = 0.5 both coordinates keep the negative entries
    out = A.graddrop(grads, noise={"w": torch.tensor([0.5, 0.5], dtype=F64)})
    torch.testing.assert_close(out.grad["w"], torch.tensor([-3.0, -3.0], dtype=F64))
    torch.testing.assert_close(out.rows["w"], torch.tensor([[0.0, -2.0], [-3.0, -1.0]], dtype=F64))


# --------------------------------------------------------------------------------------------
# properties (hypothesis)

DETERMINISTIC = [
    "mean",
    "sum",
    "mgda",
    "upgrad",
    "dualproj",
    "cagrad",
    "imtl_g",
    "aligned_mtl",
    "config",
]
SCALE_INVARIANT_WEIGHTS = [*DETERMINISTIC, "pcgrad"]


def _weights(method: str, g: torch.Tensor, **kw) -> torch.Tensor:
    fns = {
        "mean": A.mean_weights,
        "sum": A.sum_weights,
        "mgda": A.mgda_weights,
        "upgrad": A.upgrad_weights,
        "dualproj": A.dualproj_weights,
        "cagrad": A.cagrad_weights,
        "imtl_g": A.imtl_g_weights,
        "aligned_mtl": A.aligned_mtl_weights,
        "config": A.config_weights,
        "pcgrad": A.pcgrad_weights,
    }
    return fns[method](g, **kw)


matrices = st.tuples(st.integers(0, 10_000), st.integers(1, 6), st.integers(1, 12))


@given(matrices, st.sampled_from(["upgrad", "dualproj", "mgda"]))
def test_non_conflicting(mat, method):
    seed, k, n = mat
    j = _jac(seed, k, n)
    g = j @ j.T
    w = _weights(method, g)
    # UPGrad/DualProj solve on G/tr(G) + reg·I: ⟨d, g_k⟩ ≥ −reg·tr(G)·|w_k| at worst
    tol = 1e-4 * float(g.trace()) * float(w.abs().max()) + 1e-9 * float(g.trace())
    assert bool(((g @ w) >= -tol).all()), (g @ w, tol)


@given(matrices)
def test_nash_and_config_non_conflicting_on_full_rank(mat):
    seed, k, n = mat
    j = _jac(seed, k, n + k)  # n ≥ K: generic full row rank
    g = j @ j.T
    tol = 1e-7 * float(g.trace())
    assert bool(((g @ A.nash_mtl_solve(g)) > 0).all())
    assert bool(((g @ A.config_weights(g)) >= -tol).all())


@given(matrices, st.sampled_from(DETERMINISTIC))
def test_permutation_invariance(mat, method):
    seed, k, n = mat
    j = _jac(seed, k, n)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    g = j @ j.T
    w = _weights(method, g)
    wp = _weights(method, j[perm] @ j[perm].T)
    d, dp = w @ j, wp @ j[perm]
    assert float((d - dp).abs().max()) <= 1e-6 * max(1.0, float(d.abs().max()))


@given(
    matrices,
    st.sampled_from(SCALE_INVARIANT_WEIGHTS),
    st.sampled_from([1e-12, 1e-6, 1e-3, 1e3, 1e6, 1e12]),
)
def test_weights_scale_invariant(mat, method, scale):
    """Positive scaling of J leaves the weights unchanged (the aggregate scales linearly),
    from tiny to huge norms."""
    seed, k, n = mat
    j = _jac(seed, k, n)
    w = _weights(method, j @ j.T)
    ws = _weights(method, (scale * j) @ (scale * j).T)
    assert bool(torch.isfinite(ws).all())
    assert float((w - ws).abs().max()) <= 1e-5 * max(1.0, float(w.abs().max()))


@given(matrices, st.sampled_from([1e-6, 1e6]))
def test_nash_weights_scale_inversely(mat, scale):
    seed, k, n = mat
    j = _jac(seed, k, n + k)
    a = A.nash_mtl_solve(j @ j.T)
    as_ = A.nash_mtl_solve((scale * j) @ (scale * j).T)
    torch.testing.assert_close(as_ * scale, a, rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", A.METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_single_task_returns_that_gradient(method, dtype):
    g = torch.tensor([[3.0, -4.0, 0.0]], dtype=dtype)
    agg = A.aggregator(method, **({"max_norm": 0.0} if method == "nash_mtl" else {}))
    _, out = agg.update(agg.init(1), {"w": g})
    expected = g[0]
    if method == "cagrad":
        expected = 1.5 * g[0]  # (1 + c)·g with c = 0.5
    elif method == "nash_mtl":
        expected = g[0] / 5.0  # α = 1/‖g‖
    torch.testing.assert_close(out.grad["w"], expected)


@given(matrices, st.sampled_from(A.METHODS), st.sampled_from([torch.float32, F64]))
def test_zero_rows_give_finite_output(mat, method, dtype):
    seed, k, n = mat
    j = _jac(seed, k + 1, n, dtype)
    j[seed % (k + 1)] = 0.0
    agg = A.aggregator(method)
    _, out = agg.update(agg.init(k + 1), {"w": j})
    assert bool(torch.isfinite(out.grad["w"]).all()) and bool(torch.isfinite(out.weights).all())
    _, out0 = agg.update(agg.init(k + 1), {"w": torch.zeros_like(j)})
    assert bool((out0.grad["w"] == 0).all())


@pytest.mark.parametrize("method", A.METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_gives_nan_output(method, bad):
    j = _jac(0, 3, 5, torch.float32)
    j[1, 2] = bad
    agg = A.aggregator(method)
    state = agg.init(3)
    new_state, out = agg.update(state, {"w": j})
    assert not bool(torch.isfinite(out.grad["w"]).all())
    if method == "gradvac":
        torch.testing.assert_close(new_state.phi, state.phi)  # targets untouched
    if method == "nash_mtl":
        torch.testing.assert_close(new_state.alpha, state.alpha)


@given(matrices, st.sampled_from([*DETERMINISTIC, "nash_mtl"]))
def test_active_mask_equals_removing_the_rows(mat, method):
    seed, k, n = mat
    k = k + 1
    j = _jac(seed, k, n + k)
    active = torch.rand(k, generator=torch.Generator().manual_seed(seed + 1)) < 0.6
    active[seed % k] = True
    fn = {"nash_mtl": lambda g, **kw: A.nash_mtl_solve(g, **kw)}.get(
        method, lambda g, **kw: _weights(method, g, **kw)
    )
    w = fn(j @ j.T, active=active)
    sub = j[active]
    w_sub = fn(sub @ sub.T)
    assert bool((w[~active] == 0).all())
    torch.testing.assert_close(w[active], w_sub, rtol=1e-6, atol=1e-9)


def test_random_methods_are_seeded_and_advance():
    j = _jac(5, 6, 30)
    a1 = A.pcgrad_weights(j @ j.T, seed=3)
    assert torch.equal(a1, A.pcgrad_weights(j @ j.T, seed=3))
    o1 = A.graddrop({"w": j}, seed=3).grad["w"]
    assert torch.equal(o1, A.graddrop({"w": j}, seed=3).grad["w"])
    assert not torch.equal(o1, A.graddrop({"w": j}, seed=4).grad["w"])
    agg = A.aggregator("graddrop", seed=3)
    s = agg.init(6)
    s, x1 = agg.update(s, {"w": j})
    s, x2 = agg.update(s, {"w": j})
    assert int(s.count) == 2 and not torch.equal(x1.grad["w"], x2.grad["w"])


# --------------------------------------------------------------------------------------------
# adapters


@pytest.mark.parametrize("method", ["mean", "sum", "upgrad", "mgda", "imtl_g", "config"])
def test_gradient_transform_rows_sum_to_active_aggregate(method):
    j = _jac(7, 5, 12)
    active = torch.tensor([True, False, True, True, False])
    grads = _split(j)
    rows = A.as_gradient_transform(method)(grads, active)
    assert bool((rows["a"][~active] == 0).all()) and bool((rows["b"][~active] == 0).all())
    sub = _split(j[active])
    agg = A.aggregator(method)
    _, ref = agg.update(agg.init(3), sub)
    torch.testing.assert_close(rows["a"].sum(0), ref.grad["a"])
    torch.testing.assert_close(rows["b"].sum(0), ref.grad["b"])


def test_stateful_gradient_transform_threads_state():
    with pytest.raises(TypeError, match="as_stateful_gradient_transform"):
        A.as_gradient_transform("gradvac")
    init, transform = A.as_stateful_gradient_transform("graddrop", seed=1)
    j = _jac(8, 3, 9)
    state = init(3)
    state, rows = transform(state, {"w": j}, torch.tensor([True, True, False]))
    assert int(state.count) == 1 and bool((rows["w"][2] == 0).all())


class _TwoHead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(4, 3)
        self.h1 = torch.nn.Linear(3, 1)
        self.h2 = torch.nn.Linear(3, 1)
        self.unused = torch.nn.Linear(2, 2)

    def forward(self, x):
        z = torch.tanh(self.body(x))
        return self.h1(z).sum(), (self.h2(z) ** 2).sum()


@pytest.mark.parametrize("parallel", [True, False])
def test_backward_writes_aggregated_grads(parallel):
    torch.manual_seed(0)
    model = _TwoHead().double()
    x = torch.randn(5, 4, dtype=F64)
    l1, l2 = model(x)
    names = [n for n, _ in model.named_parameters() if not n.startswith("unused")]
    params = [p for n, p in model.named_parameters() if not n.startswith("unused")]
    per = [
        torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in (l1, l2)
    ]
    stacked = {
        n: torch.stack([torch.zeros_like(p) if g[i] is None else g[i] for g in per])
        for i, (n, p) in enumerate(zip(names, params, strict=True))
    }
    _, ref = A.aggregator("upgrad").update(A.EmptyState(), stacked)
    state, out = A.backward([l1, l2], model, "upgrad", parallel=parallel)
    assert state == A.EmptyState()
    for n, p in model.named_parameters():
        if n.startswith("unused"):
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, ref.grad[n])
    torch.testing.assert_close(out.weights, ref.weights)


def test_backward_rejects_non_finite_loss():
    model = _TwoHead()
    l1, l2 = model(torch.randn(2, 4))
    with pytest.raises(ValueError, match="non-finite"):
        A.backward([l1, l2 * float("nan")], model, "mean")
    assert all(p.grad is None for p in model.parameters())


def test_bad_input_errors():
    with pytest.raises(ValueError, match="gram"):
        A.upgrad_weights(torch.ones(2, 3))
    with pytest.raises(TypeError, match="floating"):
        A.mean({"w": torch.ones(2, 3, dtype=torch.int64)})
    with pytest.raises(ValueError, match="unknown method"):
        A.aggregator("nope")
    with pytest.raises(ValueError, match="active"):
        A.mgda_weights(torch.eye(3), active=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="pref"):
        A.upgrad_weights(torch.eye(3), pref=torch.ones(2))
    with pytest.raises(ValueError, match="leading axis"):
        A.mean({"a": torch.ones(2, 3), "b": torch.ones(3, 3)})
    with pytest.raises(ValueError, match="state is for"):
        A.gradvac_weights(A.gradvac_init(2), torch.eye(3))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rule", ["smooth", "zones"])
def test_gcond_is_the_sum_of_resolved_gradients(case, rule):
    from gradfn.conflict import resolve

    seed, k, n = case
    j = _jac(seed, k, n)
    grads = _split(j)
    out = A.gcond(grads, rule=rule)
    ref = resolve(grads, gram_dtype=F64, rule=rule).grads
    _close(_flat(out.grad), _flat({x: r.sum(0) for x, r in ref.items()}))
