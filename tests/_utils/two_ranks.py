"""Two gloo processes spawned by a test: each runs ``worker(rank, port, out_dir)`` and saves its
results to ``out_dir/rank{rank}.pt``; the test reads both back."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(
    worker: Callable[[int, int, str], None], *, weights_only: bool = True
) -> list[Any]:
    """Spawn ``worker`` on ranks 0 and 1 and return what each saved, by rank (``weights_only``:
    as in :func:`torch.load`)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            worker, args=(free_port(), out_dir), nprocs=2, join=True, start_method="spawn"
        )
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=weights_only)
            for r in range(2)
        ]
