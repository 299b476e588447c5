"""Counter-based random numbers from a seed: pure, device-agnostic and traceable.

One 32-bit integer hash (two multiply-xorshift rounds) of ``(key, index)`` gives every random bit
gradfn draws: PCGrad and GradVac visiting orders, GradDrop's uniforms and the sketches' hashed
projections. No generator object and no global RNG, so the same seed gives the same draw eagerly,
compiled and on any device. All arithmetic is int64 with factors below 2³¹, so no intermediate
product overflows.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["as_key", "fold_in", "hash32", "permutations", "random_bits", "uniform"]

_MASK = 0xFFFFFFFF
_MULT = 0x45D9F3B


def hash32(x: Tensor) -> Tensor:
    """A 32-bit avalanche hash of an int64 tensor (values in ``[0, 2³²)``)."""
    x = x & _MASK
    x = (((x >> 16) ^ x) * _MULT) & _MASK
    x = (((x >> 16) ^ x) * _MULT) & _MASK
    return (x >> 16) ^ x


def as_key(seed: int | Tensor, device: torch.device | str | None = None) -> Tensor:
    """A 0-d int64 key tensor from an int or a tensor seed."""
    if isinstance(seed, Tensor):
        return seed.to(dtype=torch.int64, device=device).reshape(())
    return torch.tensor(int(seed), dtype=torch.int64, device=device)


def fold_in(seed: int | Tensor, data: int | Tensor) -> Tensor:
    """A new key from ``seed`` and ``data`` (e.g. a step counter)."""
    key = as_key(seed)
    d = data.to(torch.int64) if isinstance(data, Tensor) else torch.tensor(int(data))
    return hash32(hash32(key) ^ hash32(d.to(key.device) + 0x632BE5AB))


def random_bits(key: Tensor, index: Tensor) -> Tensor:
    """32 random bits for every entry of the int64 tensor ``index``, a function of ``key``."""
    return hash32(index ^ hash32(key.to(index.device) + 0x2545F491))


def uniform(
    key: int | Tensor,
    shape: tuple[int, ...],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Uniform draws in ``[0, 1)`` of ``shape`` from ``key``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    n = 1
    for s in shape:
        n *= s
    idx = torch.arange(n, dtype=torch.int64, device=device)
    bits = random_bits(as_key(key, device), idx) >> 8  # 24 bits: exact in float32
    return (bits.to(dtype) * (1.0 / (1 << 24))).reshape(shape)


def permutations(
    key: int | Tensor, rows: int, size: int, *, device: torch.device | str | None = None
) -> Tensor:
    """``rows`` independent random permutations of ``range(size)``, shape ``(rows, size)``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    idx = torch.arange(rows * size, dtype=torch.int64, device=device)
    bits = random_bits(as_key(key, device), idx).reshape(rows, size)
    return torch.argsort(bits, dim=1, stable=True)
