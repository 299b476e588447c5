"""CPU peak memory across threads: allocator events by address, and a sampled process-wide count.

The CPU profiler (``profile_memory=True``) records allocations and frees only on the threads it
profiles. A collective backend with worker threads (gloo) can drop the last reference to a
buffer on its own thread: that free is never recorded, and the running sum of the events keeps
the buffer forever. Two ways round it, used by ``benchmarks/fsdp_memory.py``:

* :func:`account`: pair each free with its allocation by address; an address allocated again
  before its free was seen must have been freed in between (an upper bound on when);
* :func:`sampled_peak_mib`: glibc's count of ``mmap``-ed bytes (``mallinfo2().hblkhd``, one
  counter for the whole process) polled by a thread while the step runs, with every block of
  64 KiB or more served by ``mmap`` (``mallopt(M_MMAP_THRESHOLD, 64 KiB)``); smaller blocks are
  not counted and a spike shorter than the polling interval can be missed (a lower bound).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import NamedTuple

from torch.profiler import ProfilerActivity, profile

MMAP_THRESHOLD = 64 * 1024
_M_MMAP_THRESHOLD = -3


class Event(NamedTuple):
    """One allocator event: time (ns), size (bytes, negative for a free), address, kind."""

    time: int
    size: int
    ptr: int
    kind: str


class Accounting(NamedTuple):
    """Bytes (MiB) of a step from its events (:func:`account`)."""

    naive_peak: float  # running sum of the recorded events
    peak: float  # with frees inferred from address reuse
    at_peak: dict[str, float]  # live bytes by kind at ``peak``
    unseen: dict[str, float]  # bytes whose free was never recorded, by kind


def account(events: Sequence[Event], keep: Sequence[str] = ()) -> Accounting:
    """Replay ``events`` in time order. An allocation at a live address frees the earlier one
    there (its free happened out of sight); at the end, live blocks of a kind not in ``keep``
    (the step's outputs) count as unseen frees too."""
    naive = cur = naive_peak = peak = 0
    live: dict[int, tuple[int, str]] = {}
    at_peak: dict[int, tuple[int, str]] = {}
    unseen: Counter[str] = Counter()
    for ev in sorted(events, key=lambda e: e.time):
        naive += ev.size
        naive_peak = max(naive_peak, naive)
        if ev.size > 0:
            if ev.ptr in live:
                size, kind = live.pop(ev.ptr)
                cur -= size
                unseen[kind] += size
            live[ev.ptr] = (ev.size, ev.kind)
            cur += ev.size
        elif ev.ptr in live:
            cur -= live.pop(ev.ptr)[0]
        if cur > peak:
            peak, at_peak = cur, dict(live)
    for size, kind in live.values():
        if kind not in keep:
            unseen[kind] += size
    by_kind: Counter[str] = Counter()
    for size, kind in at_peak.values():
        by_kind[kind] += size
    mib = 2.0**20
    return Accounting(
        naive_peak / mib,
        peak / mib,
        {k: v / mib for k, v in by_kind.items()},
        {k: v / mib for k, v in unseen.items()},
    )


def profiled_events(fn: Callable[[], None], kind: Callable[[list[str]], str]) -> list[Event]:
    """``fn``'s allocator events from the CPU profiler; ``kind(names)`` labels an allocation by
    the names of its enclosing operators, innermost first."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    out: list[Event] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag.name != "Allocation":
            continue
        names, parent = [], node.parent
        while parent is not None:
            names.append(parent.name)
            parent = parent.parent
        fields = node.extra_fields
        out.append(Event(node.start_time_ns, fields.alloc_size, fields.ptr, kind(names)))
    return out


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            [
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            ]
        )
    ]


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or name is None:
        return None
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return libc


def mmap_large_blocks() -> bool:
    """Serve every block of :data:`MMAP_THRESHOLD` bytes or more with ``mmap`` in this process
    (call before allocating); ``False`` where glibc's ``mallinfo2`` is not available."""
    libc = _libc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def sampled_peak_mib(fn: Callable[[], None]) -> float | None:
    """Maximum over ``fn``'s run of the process's ``mmap``-ed bytes, minus the count before it
    (MiB, sampled by a thread; ``None`` without glibc's ``mallinfo2``)."""
    libc = _libc()
    if libc is None:
        return None
    base = libc.mallinfo2().hblkhd
    peak = [base]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], libc.mallinfo2().hblkhd)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
        sys.setswitchinterval(interval)
    peak[0] = max(peak[0], libc.mallinfo2().hblkhd)
    return (peak[0] - base) / 2**20
