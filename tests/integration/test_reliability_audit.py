"""The reliability audit's harness classifies known cases right: a hang, an unclear crash
(KeyError, a message naming nothing, a valid input rejected), a silent NaN, a clear error and an
ok; its quick run writes the report and the JSON."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

import gradfn.aggregators as A
from benchmarks import reliability_audit
from benchmarks._audit import Case, Wrong, run_case


def _hangs() -> None:
    while True:
        time.sleep(0.01)


def _key_error() -> None:
    raise KeyError("w")


def _silent_nan() -> None:
    out = torch.tensor([1.0, float("nan")])  # a fake entry point returning NaN from finite input
    if not bool(torch.isfinite(out).all()):
        raise Wrong("non-finite output from finite input")


def _names_it() -> None:
    raise ValueError("`lr` must be finite, got nan")


def _ok() -> None:
    A.mean(torch.ones(2, 3))


CASES = [
    (Case("fake", "hangs", _hangs, ("x",)), "hang"),
    (Case("fake", "KeyError", _key_error, ("w",)), "unclear"),
    (Case("fake", "returns NaN", _silent_nan), "wrong"),
    (Case("fake", "names the argument", _names_it, ("lr",)), "clear"),
    (Case("fake", "names another", _names_it, ("momentum",)), "unclear"),
    (Case("fake", "valid input rejected", _names_it), "unclear"),
    (Case("fake", "ok", _ok), "ok"),
    (Case("gradfn", "unknown method", lambda: A.aggregator("bogus"), ("bogus",)), "clear"),
]


@pytest.mark.parametrize(("case", "expected"), CASES, ids=[c.name for c, _ in CASES])
def test_classifies_a_known_case(case, expected):
    assert run_case(case, timeout=0.3).category == expected


def test_a_hang_outside_the_main_thread_is_caught_by_a_thread():
    box = []
    t = threading.Thread(target=lambda: box.append(run_case(Case("fake", "h", _hangs), 0.3)))
    t.start()
    t.join(5)
    assert box and box[0].category == "hang"


def test_the_quick_run_writes_the_table_and_the_details(tmp_path):
    stem = tmp_path / "audit"
    counts = reliability_audit.main(["--quick", "--out", str(stem)])
    text = (tmp_path / "audit.md").read_text()
    details = json.loads((tmp_path / "audit.json").read_text())
    assert (
        text.startswith("# Reliability audit")
        and "python -m benchmarks.reliability_audit --quick" in text
    )
    assert 20 <= sum(counts.values()) == len(details["cases"]) <= 100
    assert {c["entry"] for c in details["cases"]} >= {
        "aggregators.aggregator",
        "songoku",
        "conductor",
    }
    assert sum(c["category"] == "ok" for c in details["cases"]) == counts["ok"] > 0
