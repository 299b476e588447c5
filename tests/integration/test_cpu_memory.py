"""``benchmarks/_cpu_memory.py``: the by-address replay of allocator events (hand-made events,
hand-derived totals) and the sampled process-wide peak (a block of known size)."""

import time

import pytest
import torch

from benchmarks._cpu_memory import Event, account, sampled_peak_mib

MIB = 2**20


def test_a_reused_address_frees_the_block_seen_there_before():
    events = [
        Event(0, 10 * MIB, 1, "a"),  # freed out of sight: address 1 is reused at t = 3
        Event(1, 5 * MIB, 2, "b"),
        Event(2, -5 * MIB, 2, "b"),
        Event(3, 7 * MIB, 1, "c"),
        Event(4, 2 * MIB, 3, "d"),  # never freed, an output of the step
    ]
    acc = account(list(reversed(events)), keep=("d",))  # replayed in time order
    assert acc.naive_peak == pytest.approx(10 + 7 + 2)  # the running sum keeps "a" forever
    assert acc.peak == pytest.approx(10 + 5)  # "a" and "b" live at t = 1
    assert acc.at_peak == pytest.approx({"a": 10.0, "b": 5.0})
    assert acc.unseen == pytest.approx({"a": 10.0, "c": 7.0})  # "c" live at the end, not kept


def test_an_address_freed_in_sight_is_not_an_unseen_free():
    events = [Event(0, MIB, 1, "a"), Event(1, -MIB, 1, "a"), Event(2, MIB, 1, "a")]
    acc = account(events, keep=("a",))
    assert acc.peak == pytest.approx(1.0) and acc.naive_peak == pytest.approx(1.0)
    assert acc.unseen == {}


def test_the_sampled_peak_sees_a_block_held_during_the_step():
    def step() -> None:
        block = torch.empty(64 * MIB, dtype=torch.uint8)  # above glibc's largest mmap threshold
        time.sleep(0.05)
        del block

    peak = sampled_peak_mib(step)
    if peak is None:  # pragma: no cover - not glibc
        pytest.fail("mallinfo2 unavailable on this platform")
    assert 64 <= peak < 80
