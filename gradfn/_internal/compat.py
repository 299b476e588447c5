"""Compatibility across torch versions: the minimum torch of each feature, in one place.

The eager library needs torch ≥ 2.1 and optree ≥ 0.11 (``pyproject.toml``). Some features need
more; each entry point that uses one calls :func:`require_torch` (or :func:`require_compile`) with
its floor from :data:`TORCH_FLOORS` / :data:`OPTREE_FLOORS`, so an older version fails at once with a message naming the feature and the version, instead of an
obscure error deep inside torch. The README's "Supported versions" table says the same (a test
keeps the two in step).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

import optree
import torch

__all__ = [
    "OPTREE_FLOORS",
    "TORCH_FLOORS",
    "is_compiling",
    "require_compile",
    "require_optree",
    "require_torch",
    "torch_version",
]

TORCH_FLOORS: Mapping[str, str] = MappingProxyType(
    {
        # the eager library: the functional core, both adapters, the aggregators, DDP helpers
        "library": "2.1",
        # torch.compile(fullgraph=True) of the per-step paths: older dynamo cannot trace optree's
        # C++ tree functions (every fullgraph test fails on 2.8, all pass on 2.10)
        "compile": "2.10",
        # the adapters' `scaler=`: torch.amp.GradScaler (device-generic, CPU included) is 2.3+
        "scaler": "2.3",
    }
)

OPTREE_FLOORS: Mapping[str, str] = MappingProxyType(
    {
        "library": "0.11",
        # torch's dynamo traces optree's tree functions only from optree 0.13 (below it, torch
        # treats optree as absent and a fullgraph compile fails on its C++ flatten)
        "compile": "0.13",
    }
)


def torch_version(version: str | None = None) -> tuple[int, int, int]:
    """``(major, minor, patch)`` of a version string (default: the installed ``torch.__version__``).

    Local and pre-release tags are ignored: ``"2.10.0a0+git1234"`` → ``(2, 10, 0)``.

    Raises:
        ValueError: ``version`` does not start with ``MAJOR.MINOR``.
    """
    text = str(torch.__version__ if version is None else version)
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        raise ValueError(f"`version` must start with MAJOR.MINOR, got {text!r}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def _require(package: str, installed: str, minimum: str, feature: str, hint: str) -> None:
    if torch_version(installed) >= torch_version(minimum):
        return
    message = (
        f"{feature} needs {package} >= {minimum}, but {package} {installed} is installed "
        f"(see 'Supported versions' in gradfn's README)"
    )
    raise RuntimeError(f"{message}; {hint}" if hint else message)


def require_torch(minimum: str, *, feature: str, hint: str = "") -> None:
    """Raise if the installed torch is older than ``minimum`` (``"2.3"``, ``"2.10"``).

    ``feature`` names what the caller asked for (``"SonGokuScheduler(scaler=...)"``); ``hint``
    (optional) says what to do instead on the older torch.

    Raises:
        RuntimeError: torch is older than ``minimum``; the message names the feature, the minimum
            and the installed version.
    """
    _require("torch", str(torch.__version__), minimum, feature, hint)


def require_optree(minimum: str, *, feature: str, hint: str = "") -> None:
    """:func:`require_torch` for the installed optree."""
    _require("optree", str(optree.__version__), minimum, feature, hint)


def require_compile(feature: str, hint: str = "") -> None:
    """Raise unless torch and optree are new enough for ``torch.compile(fullgraph=True)`` of
    gradfn's functions (:data:`TORCH_FLOORS` and :data:`OPTREE_FLOORS` ``["compile"]``).

    Raises:
        RuntimeError: naming ``feature``, the package, its minimum and the installed version.
    """
    require_torch(TORCH_FLOORS["compile"], feature=feature, hint=hint)
    require_optree(OPTREE_FLOORS["compile"], feature=feature, hint=hint)


def is_compiling() -> bool:
    """True while ``torch.compile`` traces the caller (``torch.compiler.is_compiling`` from 2.3)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return bool(compiler.is_compiling())
    return bool(torch._dynamo.is_compiling())
