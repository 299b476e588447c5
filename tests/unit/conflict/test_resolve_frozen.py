"""``resolve_gramian`` against its frozen pre-refactor copy (``tests/_utils/resolve_v0.py``): every
output bit for bit (values, NaN positions, signs of zeros) on random Gramians covering both rules,
both dominance modes, with and without a history and previous gradients, rank-deficient Gramians
and non-finite entries."""

from __future__ import annotations

import itertools

import pytest
import torch

from gradfn.conflict import init_history, resolve_gramian
from tests._utils.resolve_v0 import resolve_gramian as resolve_v0


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and values; NaNs in the same places; zeros of the same sign."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    a, b = a[~nan], b[~nan]
    return torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))


def random_case(seed: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(seed)
    k = [2, 3, 4, 5, 8][seed % 5]
    n = int(torch.randint(1, 12, (), generator=gen))
    a = torch.randn(k, n, generator=gen, dtype=torch.float64)
    kind = seed % 7
    if kind == 1:  # conflicting pairs
        a[1::2] = -a[0::2][: a[1::2].shape[0]] + 0.3 * a[1::2]
    if kind == 2:  # rank-deficient: repeated and zero rows
        a[-1] = a[0]
        a[k // 2] = 0.0
    if kind == 3:  # wildly different scales
        a = a * torch.logspace(-4, 4, k, dtype=torch.float64)[:, None]
    gram = (a @ a.T).to(dtype)
    if kind == 4:  # non-finite entries
        i, j = (int(x) for x in torch.randint(0, k, (2,), generator=gen))
        gram[i, j] = [float("nan"), float("inf"), -float("inf")][seed % 3]
    if kind == 5:  # not a Gramian at all
        gram = torch.randn(k, k, generator=gen, dtype=dtype)
    p = torch.randn(k, n, generator=gen, dtype=torch.float64)
    cross = (a @ p.T).to(dtype)
    prev_sq = (p * p).sum(1).to(dtype)
    ema = (torch.rand(k, generator=gen, dtype=torch.float64) * 2).to(dtype)
    hist = torch.randint(-1, k, (int(torch.randint(0, 4, (), generator=gen)),), generator=gen)
    if seed % 3 == 0 and hist.numel():
        hist[:] = int(torch.randint(0, k, (), generator=gen))  # a dominant task
    return gram, cross, prev_sq, ema, hist


OPTIONS = list(
    itertools.product(("smooth", "zones"), ("loses", "wins"), (False, True), (False, True))
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", range(4))
def test_bit_identical_to_frozen_copy(dtype, block):
    for seed in range(block * 100, block * 100 + 100):
        gram, cross, prev_sq, ema, hist = random_case(seed, dtype)
        rule, dominance, with_prev, with_hist = OPTIONS[seed % len(OPTIONS)]
        kwargs = {
            "thresholds": [(-0.8, -0.5, 0.0), (-0.9, -0.2, 0.3), (-0.5, -0.5, -0.5)][seed % 3],
            "rule": rule,
            "dominance": dominance,
            "arbitrate_weak": seed % 2 == 1,
            "max_iters": None if seed % 4 else seed % 11,
            "remap_power": [2.0, 1.5, 3.0][seed % 3],
            "norm_floor": [None, 1e-4, 0.0][seed % 3],
            "norm_ema": ema if seed % 5 else None,
        }
        if with_prev:
            kwargs.update(prev_cross=cross, prev_sq_norms=prev_sq)
        if with_hist:
            kwargs["history"] = hist if seed % 6 else init_history(0)
        new, old = resolve_gramian(gram, **kwargs), resolve_v0(gram, **kwargs)
        for name in old._fields:
            a, b = getattr(new, name), getattr(old, name)
            if a is None and b is None:
                continue
            assert same_bits(a, b), (seed, name, a, b)
