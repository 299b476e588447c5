"""The benchmark problems: data, model, task losses and held-out metrics.

Every problem is a shared trunk with one head per task, written as a pure
``loss_fn(params, batch) -> [L_1, ..., L_K]`` over a ``dict[str, Tensor]`` of parameters
(``torch.func.functional_call`` on a small ``nn.Module``). Parameters named ``trunk.*`` are the
shared ones. The data are fixed (``data_seed``); a run's seed changes the initialisation and the
order of the mini-batches only, unless ``split_seed`` is given: then the train / validation /
test split (and the sampled data) is redrawn from it. ``n_val > 0`` holds out a validation split.

* :func:`multidigits` — scikit-learn's ``load_digits``, two digits side by side (8×16). Tasks:
  left digit, right digit (primary), parity of the left digit, right digit ≥ 5 (positive
  auxiliaries) and the left-digit labels shuffled across the training set (a deliberately
  conflicting auxiliary: pure memorisation noise for the trunk).
* :func:`planted` — synthetic regression with planted conflict groups: ``G`` group directions with
  pairwise cosine ``−1/(G−1)`` (a regular simplex), tasks aligned within their group (cosine ≈ 0.9)
  and opposed across; a bottleneck trunk one dimension short of fitting every group, so the
  conflict persists. The planted conflict graph links every cross-group pair.
* :func:`diabetes` — scikit-learn's ``load_diabetes``: disease progression (primary) plus two
  held-out features, ``bmi`` and ``s5``, as auxiliary regression targets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "PROBLEMS",
    "Problem",
    "build_problem",
    "classification_fns",
    "diabetes",
    "multidigits",
    "planted",
]

Batch = tuple[Tensor, ...]


@dataclass
class Problem:
    """One benchmark problem, built for one seed.

    ``params``: the initial parameters (fresh tensors). ``sample(gen)`` draws a training
    mini-batch; ``split(batch, n)`` cuts one into ``n`` micro-batches; ``evaluate(params)`` gives
    held-out metrics (floats), among them ``headline`` (``higher_is_better`` says its sense).
    ``planted_adjacency``: the true ``K×K`` conflict graph where one is known. ``validate``: the
    same metrics on a validation split carved from the training data (``n_val > 0``; else None).
    ``task_metrics[k]``: the metric of task ``k`` (``task_higher[k]``: its sense), for Δm %.
    """

    name: str
    task_names: list[str]
    primary: list[int]
    params: dict[str, Tensor]
    loss_fn: Callable[[dict[str, Tensor], Any], list[Tensor]]
    sample: Callable[[torch.Generator], Batch]
    evaluate: Callable[[dict[str, Tensor]], dict[str, float]]
    headline: str
    higher_is_better: bool
    batch_size: int
    planted_adjacency: Tensor | None = None
    probe: Batch | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    validate: Callable[[dict[str, Tensor]], dict[str, float]] | None = None
    task_metrics: list[str] = field(default_factory=list)
    task_higher: list[bool] = field(default_factory=list)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @staticmethod
    def shared(name: str) -> bool:
        """The shared parameters: the trunk."""
        return name.startswith("trunk.")

    @staticmethod
    def split(batch: Batch, n: int) -> list[Batch]:
        """``n`` micro-batches of (nearly) equal size along the sample axis."""
        parts = [t.tensor_split(n, dim=0) for t in batch]
        return [tuple(p[i] for p in parts) for i in range(n)]


class TrunkHeads(nn.Module):
    """A shared MLP trunk and one linear head per task (``heads.k`` maps to ``out_dims[k]``)."""

    def __init__(self, d_in: int, hidden: list[int], out_dims: list[int], act=nn.ReLU) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = d_in
        for h in hidden:
            layers += [nn.Linear(d, h), act()]
            d = h
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList([nn.Linear(d, o) for o in out_dims])

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.trunk(x)
        return [head(z) for head in self.heads]


def _init_params(model: nn.Module, seed: int) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _sampler(n: int, batch_size: int, tensors: Batch) -> Callable[[torch.Generator], Batch]:
    def sample(gen: torch.Generator) -> Batch:
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        return tuple(t[idx] for t in tensors)

    return sample


# ---------------------------------------------------------------------------------------------
# MultiDigits


def classification_fns(
    model: nn.Module, names: list[str]
) -> tuple[Callable[..., list[Tensor]], Callable[..., dict[str, float]]]:
    """``loss_fn(params, batch)``: one cross-entropy per head of ``model`` (its outputs in the
    order of ``names``, labels ``y[:, k]``); ``metrics(params, x, y)``: each head's accuracy
    ``acc_<name>`` and ``primary_acc``, the mean of the ``left`` and ``right`` accuracies."""

    def loss_fn(params: dict[str, Tensor], batch: Batch) -> list[Tensor]:
        x, y = batch
        logits = functional_call(model, params, (x,))
        return [nn.functional.cross_entropy(o, y[:, k]) for k, o in enumerate(logits)]

    def metrics(params: dict[str, Tensor], x: Tensor, y: Tensor) -> dict[str, float]:
        with torch.no_grad():
            logits = functional_call(model, params, (x,))
        acc = {
            f"acc_{n}": float((o.argmax(1) == y[:, k]).float().mean())
            for k, (n, o) in enumerate(zip(names, logits, strict=True))
        }
        acc["primary_acc"] = 0.5 * (acc["acc_left"] + acc["acc_right"])
        return acc

    return loss_fn, metrics


def multidigits(
    seed: int,
    *,
    n_train: int = 3000,
    n_test: int = 1000,
    hidden: tuple[int, ...] = (128, 64),
    batch_size: int = 64,
    data_seed: int = 0,
    n_val: int = 0,
    split_seed: int | None = None,
) -> Problem:
    """Two ``load_digits`` images side by side; 5 classification tasks (module docstring).
    With ``n_val`` the validation pairs come from 200 of the 1200 training images."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    rng = np.random.default_rng(data_seed if split_seed is None else (data_seed, split_seed))
    order = rng.permutation(len(labels))
    pool_train, pool_test = order[: 1200 - (200 if n_val else 0)], order[1200:]

    def pairs(pool: np.ndarray, n: int) -> tuple[Tensor, Tensor, Tensor]:
        left, right = rng.choice(pool, n), rng.choice(pool, n)
        img = np.concatenate(
            [images[left].reshape(n, 8, 8), images[right].reshape(n, 8, 8)], axis=2
        )
        x = torch.tensor(img.reshape(n, 128) / 16.0, dtype=torch.float32)
        return x, torch.tensor(labels[left]), torch.tensor(labels[right])

    def targets(lt: Tensor, rt: Tensor, shuffled: Tensor) -> Tensor:
        return torch.stack([lt, rt, lt % 2, (rt >= 5).long(), shuffled], dim=1)

    x_tr, l_tr, r_tr = pairs(pool_train, n_train)
    x_te, l_te, r_te = pairs(pool_test, n_test)
    shuffled_tr = l_tr[torch.as_tensor(rng.permutation(n_train))]
    shuffled_te = l_te[torch.as_tensor(rng.permutation(n_test))]
    y_tr, y_te = targets(l_tr, r_tr, shuffled_tr), targets(l_te, r_te, shuffled_te)
    if n_val:
        x_va, l_va, r_va = pairs(order[1000:1200], n_val)
        y_va = targets(l_va, r_va, l_va[torch.as_tensor(rng.permutation(n_val))])

    names = ["left", "right", "parity", "ge5", "shuffled"]
    classes = [10, 10, 2, 2, 10]
    model = TrunkHeads(128, list(hidden), classes)

    loss_fn, metrics = classification_fns(model, names)

    def evaluate(params: dict[str, Tensor]) -> dict[str, float]:
        return metrics(params, x_te, y_te)

    return Problem(
        name="multidigits",
        task_names=names,
        primary=[0, 1],
        params=_init_params(model, seed),
        loss_fn=loss_fn,
        sample=_sampler(n_train, batch_size, (x_tr, y_tr)),
        evaluate=evaluate,
        headline="primary_acc",
        higher_is_better=True,
        batch_size=batch_size,
        probe=(x_tr, y_tr) if n_val else (x_tr[:256], y_tr[:256]),  # protocol: full batch
        notes={"n_train": n_train, "n_test": n_test, "hidden": list(hidden)},
        validate=(lambda p: metrics(p, x_va, y_va)) if n_val else None,
        task_metrics=[f"acc_{n}" for n in names],
        task_higher=[True] * len(names),
    )


# ---------------------------------------------------------------------------------------------
# planted conflict groups


def simplex_directions(g: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """``g`` unit vectors in ``R^d`` with pairwise cosine ``−1/(g−1)`` (a rotated regular simplex)."""
    e = np.eye(g) - 1.0 / g
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    basis, _ = np.linalg.qr(rng.standard_normal((d, g)))
    return e @ basis.T


def planted(
    seed: int,
    *,
    num_tasks: int = 6,
    num_groups: int | None = None,
    d: int = 20,
    hidden: int = 32,
    n_train: int = 256,
    n_test: int = 2000,
    noise: float = 0.3,
    spread: float = 0.3,
    batch_size: int = 32,
    data_seed: int = 0,
    n_val: int = 0,
    split_seed: int | None = None,
) -> Problem:
    """``K`` linear-teacher regression tasks in ``G`` opposed groups (module docstring).

    Task ``k`` in group ``g`` has teacher ``w_k = s_k (u_g + spread·ξ_k)`` (``ξ_k`` a random unit
    vector, ``s_k`` a log-uniform scale in ``[0.5, 2]``); ``y_k = x·w_k + noise·ε``. The trunk is
    ``d → hidden → G−2`` (tanh), one short of the ``G−1`` dimensions the group directions span.
    All heads start equal, so the early trunk gradients inherit the teacher geometry.
    Metrics: test MSE relative to each target's variance (mean and worst over tasks).
    """
    g = num_groups if num_groups is not None else (3 if num_tasks <= 8 else 4)
    if num_tasks % g:
        raise ValueError(f"num_tasks={num_tasks} must be a multiple of num_groups={g}")
    rng = np.random.default_rng(data_seed + 1000 * num_tasks)
    u = simplex_directions(g, d, rng)
    group = np.repeat(np.arange(g), num_tasks // g)
    xi = rng.standard_normal((num_tasks, d))
    xi /= np.linalg.norm(xi, axis=1, keepdims=True)
    scale = np.exp(rng.uniform(np.log(0.5), np.log(2.0), num_tasks))
    w = scale[:, None] * (u[group] + spread * xi)
    # the teachers stay; a split seed redraws the samples
    rng_x = rng if split_seed is None else np.random.default_rng((data_seed, split_seed))

    def data(n: int) -> tuple[Tensor, Tensor]:
        x = rng_x.standard_normal((n, d))
        y = x @ w.T + noise * scale[None, :] * rng_x.standard_normal((n, num_tasks))
        return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)

    x_tr, y_tr = data(n_train)
    x_te, y_te = data(n_test)
    x_va, y_va = data(n_val) if n_val else (x_te, y_te)
    model = TrunkHeads(d, [hidden, max(1, g - 2)], [1] * num_tasks, act=nn.Tanh)
    params = _init_params(model, seed)
    for k in range(1, num_tasks):  # identical heads (docstring)
        params[f"heads.{k}.weight"] = params["heads.0.weight"].clone()
        params[f"heads.{k}.bias"] = params["heads.0.bias"].clone()

    def loss_fn(params: dict[str, Tensor], batch: Batch) -> list[Tensor]:
        x, y = batch
        out = functional_call(model, params, (x,))
        return [((o[:, 0] - y[:, k]) ** 2).mean() for k, o in enumerate(out)]

    def evaluate(params: dict[str, Tensor], x: Tensor = x_te, y: Tensor = y_te) -> dict[str, float]:
        with torch.no_grad():
            out = torch.cat(functional_call(model, params, (x,)), dim=1)
        rel = ((out - y) ** 2).mean(dim=0) / y.var(dim=0)
        metrics = {f"rel_mse_{k}": float(v) for k, v in enumerate(rel)}
        metrics["mean_rel_mse"] = float(rel.mean())
        metrics["worst_rel_mse"] = float(rel.max())
        return metrics

    adj = torch.tensor(group[:, None] != group[None, :])
    return Problem(
        name=f"planted_k{num_tasks}",
        task_names=[f"g{group[k]}t{k}" for k in range(num_tasks)],
        primary=list(range(num_tasks)),
        params=params,
        loss_fn=loss_fn,
        sample=_sampler(n_train, batch_size, (x_tr, y_tr)),
        evaluate=evaluate,
        headline="mean_rel_mse",
        higher_is_better=False,
        batch_size=batch_size,
        planted_adjacency=adj,
        probe=(x_tr, y_tr),
        notes={"groups": g, "group_of_task": group.tolist(), "cos_across": -1.0 / (g - 1)},
        validate=(lambda p: evaluate(p, x_va, y_va)) if n_val else None,
        task_metrics=[f"rel_mse_{k}" for k in range(num_tasks)],
        task_higher=[False] * num_tasks,
    )


# ---------------------------------------------------------------------------------------------
# diabetes


def diabetes(
    seed: int,
    *,
    hidden: tuple[int, ...] = (32, 32),
    batch_size: int = 32,
    data_seed: int = 0,
    n_val: int = 0,
    split_seed: int | None = None,
    target_scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> Problem:
    """``load_diabetes``: progression (primary), ``bmi`` and ``s5`` (auxiliary) from the other 8
    features; all standardised on the training split. Metrics: test MSE and R² per target.
    ``n_val``: that many training samples held out for validation. ``target_scale``: the
    standardised targets multiplied by these (the losses by their squares)."""
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    x_all, prog = bunch.data, bunch.target
    cols = list(bunch.feature_names)
    aux = [cols.index("bmi"), cols.index("s5")]
    keep = [i for i in range(len(cols)) if i not in aux]
    rng = np.random.default_rng(data_seed if split_seed is None else (data_seed, split_seed))
    order = rng.permutation(len(prog))
    n_all = int(0.7 * len(prog))
    n_tr = n_all - n_val
    y_all = np.column_stack([prog, x_all[:, aux]])
    x_all = x_all[:, keep]

    def standardise(a: np.ndarray) -> np.ndarray:
        mu, sd = a[order[:n_tr]].mean(0), a[order[:n_tr]].std(0)
        return (a - mu) / sd

    x = torch.tensor(standardise(x_all), dtype=torch.float32)
    y = torch.tensor(standardise(y_all) * np.asarray(target_scale), dtype=torch.float32)
    x_tr, y_tr = x[order[:n_tr]], y[order[:n_tr]]
    x_te, y_te = x[order[n_all:]], y[order[n_all:]]
    x_va, y_va = x[order[n_tr:n_all]], y[order[n_tr:n_all]]
    names = ["progression", "bmi", "s5"]
    model = TrunkHeads(len(keep), list(hidden), [1, 1, 1])

    def loss_fn(params: dict[str, Tensor], batch: Batch) -> list[Tensor]:
        xb, yb = batch
        out = functional_call(model, params, (xb,))
        return [((o[:, 0] - yb[:, k]) ** 2).mean() for k, o in enumerate(out)]

    def evaluate(params: dict[str, Tensor], x: Tensor = x_te, y: Tensor = y_te) -> dict[str, float]:
        with torch.no_grad():
            out = torch.cat(functional_call(model, params, (x,)), dim=1)
        mse = ((out - y) ** 2).mean(dim=0)
        r2 = 1.0 - mse / y.var(dim=0, unbiased=False)
        metrics = {f"mse_{n}": float(mse[k]) for k, n in enumerate(names)}
        metrics.update({f"r2_{n}": float(r2[k]) for k, n in enumerate(names)})
        return metrics

    return Problem(
        name="diabetes" if target_scale == (1.0, 1.0, 1.0) else "diabetes_scaled",
        task_names=names,
        primary=[0],
        params=_init_params(model, seed),
        loss_fn=loss_fn,
        sample=_sampler(n_tr, batch_size, (x_tr, y_tr)),
        evaluate=evaluate,
        headline="mse_progression",
        higher_is_better=False,
        batch_size=batch_size,
        probe=(x_tr, y_tr),
        notes={"n_train": n_tr, "n_val": n_val, "n_test": len(prog) - n_all},
        validate=(lambda p: evaluate(p, x_va, y_va)) if n_val else None,
        task_metrics=[f"mse_{n}" for n in names],
        task_higher=[False] * len(names),
    )


PROBLEMS: dict[str, Callable[..., Problem]] = {
    "multidigits": multidigits,
    "planted_k6": lambda seed, **kw: planted(seed, num_tasks=6, **kw),
    "planted_k16": lambda seed, **kw: planted(seed, num_tasks=16, **kw),
    "diabetes": diabetes,
}


def build_problem(name: str, seed: int, **overrides: Any) -> Problem:
    """The problem ``name`` (a key of :data:`PROBLEMS`) for ``seed``."""
    from benchmarks.quality.problems_extra import EXTRA  # more problems (that module's docstring)

    every = {**PROBLEMS, **EXTRA}
    if name not in every:
        raise ValueError(f"unknown problem {name!r}; expected one of {sorted(every)}")
    return every[name](seed, **overrides)
