"""More benchmark problems for the tuned protocol (same :class:`Problem` interface).

* ``diabetes_scaled`` — :func:`~benchmarks.quality.problems.diabetes` with the standardised
  targets multiplied by ×1, ×100 and ×0.01: the task losses differ by ~10⁴× each way.
* :func:`planted_fixed_sign` — planted conflict that persists in trunk-gradient space: the
  trunk emits one scalar ``s(x)`` and every head reads it through the same fixed, non-learnable
  map, ``s(x) + b_k`` (only the offset ``b_k`` is learnt). Two groups have opposite teachers
  (``u`` and ``−u``), so group 0 needs ``s ≈ x·u`` and group 1 ``s ≈ −x·u``; no head can flip
  the sign or shrink its slope, hence the tasks of the two groups keep pulling the trunk in
  opposite directions (``∂L_k/∂θ = 2 E[r_k ∂s/∂θ]``, residuals ``r_k`` of opposite sign across
  the groups) for the whole run. (With learnable positive slopes a group's heads drop theirs
  towards 0 and the cross-group cosine decays to ≈ −0.2 in 200 steps; in ``planted`` a head
  can flip sign.)
* :func:`overlap_digits` — MultiMNIST-shaped: two ``load_digits`` digits overlaid on an 8×12
  canvas (left digit at columns 0–7, right at 4–11, pixel-wise max), a small CNN trunk; task 1
  the left digit, task 2 the right digit.
* :func:`multi_fashion` — the same on Fashion-MNIST (Debian's ``dataset-fashion-mnist``; images
  average-pooled 28→14, canvas 14×20). Absent data: a ``FileNotFoundError`` naming the package.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from benchmarks.quality.problems import (
    Batch,
    Problem,
    _sampler,
    classification_fns,
    diabetes,
    simplex_directions,
)

__all__ = ["EXTRA", "FASHION_DIR", "multi_fashion", "overlap_digits", "planted_fixed_sign"]

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


class _Offset(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))


class _ScalarReadout(nn.Module):
    """Trunk ``d → hidden → 1`` (tanh); head ``k``: ``s + b_k`` (fixed unit readout, a learnable
    offset only)."""

    def __init__(self, d: int, hidden: int, k: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.heads = nn.ModuleList([_Offset() for _ in range(k)])

    def forward(self, x: Tensor) -> list[Tensor]:
        s = self.trunk(x)
        return [s + h.bias for h in self.heads]


def planted_fixed_sign(
    seed: int,
    *,
    num_tasks: int = 6,
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
    """``K`` regression tasks in 2 groups with teachers ``±s_k (u + spread·ξ_k)`` (docstring
    of the module); metrics: test MSE relative to each target's variance."""
    if num_tasks % 2 or num_tasks < 2:
        raise ValueError(f"num_tasks must be even and ≥ 2 (got {num_tasks})")
    rng = np.random.default_rng(data_seed + 7000 + num_tasks)
    u = simplex_directions(2, d, rng)  # u_1 = −u_0
    group = np.repeat(np.arange(2), num_tasks // 2)
    xi = rng.standard_normal((num_tasks, d))
    xi /= np.linalg.norm(xi, axis=1, keepdims=True)
    scale = np.exp(rng.uniform(np.log(0.5), np.log(2.0), num_tasks))
    w = scale[:, None] * (u[group] + spread * xi)
    rng_x = rng if split_seed is None else np.random.default_rng((data_seed, split_seed, 7))

    def data(n: int) -> tuple[Tensor, Tensor]:
        x = rng_x.standard_normal((n, d))
        y = x @ w.T + noise * scale[None, :] * rng_x.standard_normal((n, num_tasks))
        return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)

    x_tr, y_tr = data(n_train)
    x_te, y_te = data(n_test)
    x_va, y_va = data(n_val) if n_val else (x_te, y_te)
    torch.manual_seed(seed)
    model = _ScalarReadout(d, hidden, num_tasks)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}

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

    return Problem(
        name=f"planted_fixed_sign_k{num_tasks}",
        task_names=[f"g{group[k]}t{k}" for k in range(num_tasks)],
        primary=list(range(num_tasks)),
        params=params,
        loss_fn=loss_fn,
        sample=_sampler(n_train, batch_size, (x_tr, y_tr)),
        evaluate=evaluate,
        headline="mean_rel_mse",
        higher_is_better=False,
        batch_size=batch_size,
        planted_adjacency=torch.tensor(group[:, None] != group[None, :]),
        probe=(x_tr, y_tr),
        notes={"groups": 2, "group_of_task": group.tolist(), "cos_across": -1.0},
        validate=(lambda p: evaluate(p, x_va, y_va)) if n_val else None,
        task_metrics=[f"rel_mse_{k}" for k in range(num_tasks)],
        task_higher=[False] * num_tasks,
    )


class _SmallCNN(nn.Module):
    """Trunk: conv 3×3 (8) → ReLU → max-pool 2 → conv 3×3 (16) → ReLU → avg-pool to 2×3 →
    linear 96 → 64 (ReLU); two linear heads of 10 classes. Input ``(B, 1, H, W)``."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d((2, 3)),
            nn.Flatten(),
            nn.Linear(96, 64),
            nn.ReLU(),
        )
        self.heads = nn.ModuleList([nn.Linear(64, 10) for _ in range(2)])

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.trunk(x)
        return [h(z) for h in self.heads]


def _overlap_problem(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    pools: tuple[np.ndarray, np.ndarray, np.ndarray],
    shift: int,
    seed: int,
    n_train: int,
    n_test: int,
    n_val: int,
    batch_size: int,
    rng: np.random.Generator,
) -> Problem:
    """Pairs of ``images`` (N, h, w) in [0, 1] overlaid with the right one ``shift`` columns on:
    canvas ``h × (w + shift)``, pixel-wise max. ``pools``: train / validation / test images."""
    _, h, w = images.shape

    def pairs(pool: np.ndarray, n: int) -> tuple[Tensor, Tensor]:
        left, right = rng.choice(pool, n), rng.choice(pool, n)
        canvas = np.zeros((n, h, w + shift), dtype=np.float32)
        canvas[:, :, :w] = images[left]
        canvas[:, :, shift:] = np.maximum(canvas[:, :, shift:], images[right])
        y = np.stack([labels[left], labels[right]], axis=1)
        return torch.tensor(canvas[:, None]), torch.tensor(y, dtype=torch.long)

    x_tr, y_tr = pairs(pools[0], n_train)
    x_te, y_te = pairs(pools[2], n_test)
    x_va, y_va = pairs(pools[1], n_val) if n_val else (x_te, y_te)
    torch.manual_seed(seed)
    model = _SmallCNN()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = ["left", "right"]

    loss_fn, metrics = classification_fns(model, names)

    return Problem(
        name=name,
        task_names=names,
        primary=[0, 1],
        params=params,
        loss_fn=loss_fn,
        sample=_sampler(n_train, batch_size, (x_tr, y_tr)),
        evaluate=lambda p: metrics(p, x_te, y_te),
        headline="primary_acc",
        higher_is_better=True,
        batch_size=batch_size,
        probe=(x_tr[:1000], y_tr[:1000]),
        notes={"n_train": n_train, "n_test": n_test, "canvas": [h, w + shift]},
        validate=(lambda p: metrics(p, x_va, y_va)) if n_val else None,
        task_metrics=["acc_left", "acc_right"],
        task_higher=[True, True],
    )


def overlap_digits(
    seed: int,
    *,
    n_train: int = 3000,
    n_test: int = 1000,
    batch_size: int = 64,
    data_seed: int = 0,
    n_val: int = 0,
    split_seed: int | None = None,
) -> Problem:
    """Two overlapping ``load_digits`` digits (module docstring); images split 1000 train /
    200 validation / 597 test before pairing."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    rng = np.random.default_rng(data_seed if split_seed is None else (data_seed, split_seed))
    order = rng.permutation(len(labels))
    pools = (order[:1000], order[1000:1200], order[1200:])
    img = images.reshape(-1, 8, 8) / 16.0
    return _overlap_problem(
        "overlap_digits", img, labels, pools, 4, seed, n_train, n_test, n_val, batch_size, rng
    )


def _idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format), gzipped."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def multi_fashion(
    seed: int,
    *,
    n_train: int = 6000,
    n_test: int = 2000,
    batch_size: int = 64,
    data_seed: int = 0,
    n_val: int = 0,
    split_seed: int | None = None,
    root: Path | None = None,
) -> Problem:
    """Two overlapping Fashion-MNIST items (module docstring): training pairs from the first
    5/6 of the training images (50 000), validation pairs from the rest, test pairs from the
    test set. ``root``: the folder of the four gzipped IDX files (default :data:`FASHION_DIR`)."""
    root = FASHION_DIR if root is None else root
    files = [
        root / f"{s}-{k}-idx{d}-ubyte.gz"
        for s in ("train", "t10k")
        for k, d in (("images", 3), ("labels", 1))
    ]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"multi_fashion: {missing[0]} not found; install Debian's dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist)"
        )
    tr_x, tr_y, te_x, te_y = (_idx(f) for f in files)
    images = np.concatenate([tr_x, te_x]).astype(np.float32) / 255.0
    images = images.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4))  # 28 → 14
    labels = np.concatenate([tr_y, te_y]).astype(np.int64)
    rng = np.random.default_rng(data_seed if split_seed is None else (data_seed, split_seed))
    n_tr, n_all = len(tr_y), len(labels)
    cut = n_tr * 5 // 6  # 50 000 of the 60 000
    pools = (np.arange(cut), np.arange(cut, n_tr), np.arange(n_tr, n_all))
    return _overlap_problem(
        "multi_fashion", images, labels, pools, 6, seed, n_train, n_test, n_val, batch_size, rng
    )


EXTRA: dict[str, Callable[..., Problem]] = {
    "diabetes_scaled": lambda seed, **kw: diabetes(seed, target_scale=(1.0, 100.0, 0.01), **kw),
    "planted_fixed_sign": planted_fixed_sign,
    "overlap_digits": overlap_digits,
    "multi_fashion": multi_fashion,
}
