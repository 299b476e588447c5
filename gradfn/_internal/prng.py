"""Counter-based random numbers from a seed: pure, device-agnostic and traceable.

One 32-bit integer hash (two multiply-xorshift rounds) of ``(key, index)`` gives every random bit
gradfn draws: PCGrad and GradVac visiting orders, GradDrop's uniforms and the sketches' hashed
projections. No generator object and no global RNG, so the same seed gives the same draw eagerly,
compiled and on any device. All arithmetic is int64 with factors below 2³¹, so no intermediate
product overflows.

Eagerly, where a key lives on the CPU, keys are derived with the same hash on Python integers
(a free read-back instead of ~30 tiny tensor ops), and long draws are hashed in cache-sized
chunks; the values are the same bits either way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradfn._internal.compat import is_compiling

__all__ = ["as_key", "fold_in", "hash32", "permutations", "random_bits", "uniform"]

_MASK = 0xFFFFFFFF
_MULT = 0x45D9F3B
_CHUNK = 1 << 15  # eager hashing works on chunks of this many entries (they stay in cache)


def hash32(x: Tensor) -> Tensor:
    """A 32-bit avalanche hash of an int64 tensor (values in ``[0, 2³²)``)."""
    return _mix(x & _MASK)


def _mix(x: Tensor) -> Tensor:
    """:func:`hash32` of values already in ``[0, 2³²)``."""
    x = (((x >> 16) ^ x) * _MULT) & _MASK
    x = (((x >> 16) ^ x) * _MULT) & _MASK
    return (x >> 16) ^ x


def _mix_(x: Tensor) -> Tensor:
    """:func:`_mix` in place (eager only: ``x`` is a fresh int64 buffer)."""
    for _ in range(2):
        x.bitwise_xor_(x >> 16).mul_(_MULT).bitwise_and_(_MASK)
    return x.bitwise_xor_(x >> 16)


def _hash32_int(x: int) -> int:
    """:func:`hash32` on a Python integer (bit for bit the same)."""
    x &= _MASK
    x = (((x >> 16) ^ x) * _MULT) & _MASK
    x = (((x >> 16) ^ x) * _MULT) & _MASK
    return (x >> 16) ^ x


def _host_int(x: int | Tensor) -> int | None:
    """``x`` as a Python int when reading it costs nothing (an int, or a CPU tensor eagerly)."""
    if isinstance(x, int):
        return x
    if x.device.type != "cpu" or x.numel() != 1 or is_compiling():
        return None
    try:
        return int(x)
    except RuntimeError:  # a functorch-wrapped tensor (vmap / grad): stay in tensor land
        return None


def as_key(seed: int | Tensor, device: torch.device | str | None = None) -> Tensor:
    """A 0-d int64 key tensor from an int or a tensor seed."""
    if isinstance(seed, Tensor):
        return seed.to(dtype=torch.int64, device=device).reshape(())
    return torch.tensor(int(seed), dtype=torch.int64, device=device)


def fold_in(seed: int | Tensor, data: int | Tensor) -> Tensor:
    """A new key from ``seed`` and ``data`` (e.g. a step counter)."""
    s, d = _host_int(seed), _host_int(data)
    if s is not None and d is not None:
        device = seed.device if isinstance(seed, Tensor) else None
        k = _hash32_int(_hash32_int(s) ^ _hash32_int(d + 0x632BE5AB))
        return torch.tensor(k, dtype=torch.int64, device=device)
    key = as_key(seed)
    dt = data.to(torch.int64) if isinstance(data, Tensor) else torch.tensor(int(data))
    return hash32(hash32(key) ^ hash32(dt.to(key.device) + 0x632BE5AB))


def _inner(key: int | Tensor, device: torch.device) -> int | Tensor:
    """``hash32(key + c)``: the per-key half of :func:`random_bits`."""
    k = _host_int(key)
    if k is not None:
        return _hash32_int(k + 0x2545F491)
    return hash32(as_key(key, device) + 0x2545F491)


def random_bits(key: Tensor, index: Tensor) -> Tensor:
    """32 random bits for every entry of the int64 tensor ``index``, a function of ``key``."""
    return hash32(index ^ _inner(key, index.device))


def _arange_bits(
    key: int | Tensor, n: int, device: torch.device, dtype: torch.dtype | None = None
) -> Tensor:
    """``random_bits(key, arange(n))`` (int64, ``(n,)``), or with ``dtype`` the uniforms
    ``(bits >> 8) / 2²⁴`` in that floating dtype (24 bits: exact in float32)."""
    inner = _inner(key, device)
    if is_compiling() or n <= _CHUNK or isinstance(inner, Tensor):
        bits = _mix(torch.arange(n, dtype=torch.int64, device=device) ^ inner)
        return bits if dtype is None else (bits >> 8).to(dtype) * (1.0 / (1 << 24))
    out = torch.empty(n, dtype=torch.int64 if dtype is None else dtype, device=device)
    for start in range(0, n, _CHUNK):  # int32 arange: its int64 kernel is several times slower
        stop = min(n, start + _CHUNK)
        x = torch.arange(start, stop, dtype=torch.int32, device=device).to(torch.int64)
        x = _mix_(x.bitwise_xor_(inner))
        if dtype is None:
            out[start:stop] = x
        else:
            torch.mul(x.bitwise_right_shift_(8), 1.0 / (1 << 24), out=out[start:stop])
    return out


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
    return _arange_bits(key, n, device, dtype).reshape(shape)


def permutations(
    key: int | Tensor, rows: int, size: int, *, device: torch.device | str | None = None
) -> Tensor:
    """``rows`` independent random permutations of ``range(size)``, shape ``(rows, size)``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    bits = _arange_bits(key, rows * size, device).reshape(rows, size)
    return torch.argsort(bits, dim=1, stable=True)
