"""Small compatibility helpers across the supported torch versions (≥ 2.1)."""

from __future__ import annotations

import torch

__all__ = ["is_compiling"]


def is_compiling() -> bool:
    """True while ``torch.compile`` traces the caller (``torch.compiler.is_compiling`` from 2.3)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return bool(compiler.is_compiling())
    return bool(torch._dynamo.is_compiling())
