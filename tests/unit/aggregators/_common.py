"""Helpers of the aggregator tests: planted-conflict Jacobians split into two-leaf pytrees."""

from __future__ import annotations

import torch

import gradfn.aggregators as A

F64 = torch.float64
CASES = [(0, 2, 6), (1, 3, 10), (2, 5, 20), (3, 6, 4), (4, 8, 40)]  # (seed, K, n); (3,6,4): rank 4


def jac(seed: int, k: int, n: int, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    j = torch.randn(k, n, generator=g, dtype=dtype)
    if k >= 2:  # plant a conflict
        j[1] = -0.7 * j[0] + 0.3 * j[1]
    return j


def split(j: torch.Tensor) -> dict[str, torch.Tensor]:
    """A two-leaf task-stacked pytree holding the rows of ``j``."""
    k, n = j.shape
    cut = n // 2
    return {"a": j[:, :cut].reshape(k, cut), "b": j[:, cut:]}


def flat(tree: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tree["a"].reshape(-1), tree["b"].reshape(-1)])


def close(mine: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-9) -> None:
    scale = max(float(ref.abs().max()), 1e-12)
    assert float((mine - ref).abs().max()) <= rtol * scale + 1e-12, (mine, ref)


def weights_of(method: str, g: torch.Tensor, **kw) -> torch.Tensor:
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
