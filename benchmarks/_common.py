"""What every benchmark shares: ``--threads`` / ``--device`` / ``--progress``, the environment
line of a table, timing of several runners side by side (interleaved rounds, median and spread)
and progress bars (:mod:`benchmarks._progress`: tqdm on stderr, stdout unchanged).

Every script calls :func:`add_common_args` on its parser and :func:`setup` on the parsed
arguments; ``bash benchmarks/gpu.sh`` runs each script with ``--device cuda``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable, Mapping

import torch

from benchmarks._progress import Progress, add_progress_arg, progress, set_default

__all__ = [
    "Progress",
    "Timing",
    "add_common_args",
    "environment",
    "interleave",
    "progress",
    "ratio_spread",
    "setup",
    "sync",
]


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """``--threads`` (torch intra-op threads, default 1), ``--device`` (default ``cpu``) and
    ``--progress`` / ``--no-progress`` (default: bars when stderr is a terminal)."""
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default: 1)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    add_progress_arg(parser)


def setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` and ``--progress``; check and return ``--device`` (exits with a message
    when absent)."""
    set_default(getattr(args, "progress", None))
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise SystemExit(f"--device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch build sees no CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda, got {args.device!r}")
    return device


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (a no-op on the CPU) so that a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> str:
    """One line naming what a table was measured on."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU ({platform.machine()}), {torch.get_num_threads()} torch thread(s)"
    return f"torch {torch.__version__}, {where}"


class Timing:
    """Seconds per call of one runner over interleaved rounds: median and spread."""

    def __init__(self, samples: list[float]) -> None:
        self.samples = samples

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> tuple[float, float]:
        """(min, max) over the rounds."""
        return min(self.samples), max(self.samples)

    def ms(self) -> str:
        """``median ms [min–max]``."""
        lo, hi = self.spread
        return f"{self.median * 1e3:.2f} [{lo * 1e3:.2f}–{hi * 1e3:.2f}]"


def ratio_spread(num: Timing, den: Timing) -> str:
    """``median ratio [min–max]`` of per-round ratios (rounds paired, so drift cancels)."""
    ratios = [a / b for a, b in zip(num.samples, den.samples, strict=False)]
    return f"{statistics.median(ratios):.2f}× [{min(ratios):.2f}–{max(ratios):.2f}]"


def interleave(
    runners: Mapping[str, Callable[[], object]],
    device: torch.device,
    *,
    rounds: int,
    calls: int = 1,
    warmup: int = 1,
    desc: str = "timing",
) -> dict[str, Timing]:
    """Time each runner side by side: every round runs each runner ``calls`` times in turn
    (order rotated by round), after ``warmup`` untimed calls each. A transient progress bar
    (``desc``) counts the ``len(runners) × (warmup + rounds)`` batches of calls."""
    names = list(runners)
    with Progress(len(names) * (warmup + rounds), desc, leave=False) as bar:
        for name in names:
            for _ in range(warmup):
                runners[name]()
                bar.update()
        sync(device)
        samples: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                fn = runners[name]
                sync(device)
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                sync(device)
                samples[name].append((time.perf_counter() - t0) / calls)
                bar.update()  # outside the timed region
    return {name: Timing(s) for name, s in samples.items()}
