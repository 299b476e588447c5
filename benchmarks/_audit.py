"""The reliability audit's machinery: a :class:`Case`, its classification and the report.

A case runs in this process (no subprocess) under a per-case timeout (``signal.setitimer``,
which interrupts Python code; a case still running when it fires is a **hang**) and lands in
one category:

* ``clear``: a ``ValueError`` / ``TypeError`` / ``RuntimeError`` whose message contains one of
  the case's ``names`` (the argument the case broke, or the word for the problem), on input the
  case marks invalid;
* ``unclear``: any other exception, an error whose message names none of ``names``, or any
  exception on input the case marks valid (a numpy scalar, K = 1, a float64 input);
* ``wrong``: no exception, but the case's oracle raised :class:`Wrong` (non-finite output from
  finite input, a deviation from TorchJD or a naive loop, a state changed by a skipped step, a
  resume or a rerun that is not bit-identical, a non-finite hyper-parameter accepted);
* ``ok``: no exception and the oracle holds;
* ``hang``: still running after the timeout.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CATEGORIES", "Case", "Hang", "Result", "Wrong", "classify", "run_case", "write_report"]

CATEGORIES = ("ok", "clear", "unclear", "wrong", "hang")
CLEAR_TYPES = (ValueError, TypeError, RuntimeError)


class Wrong(Exception):
    """Raised by a case's oracle: the call returned, but its result is wrong."""


class Hang(BaseException):
    """Raised into a case by the timer (a BaseException, so ``except Exception`` cannot eat it)."""


@dataclass
class Case:
    """One call of one entry point.

    ``fn()`` makes the call and checks its oracle (raising :class:`Wrong`); ``names``: the words
    a clear error message contains (empty: the input is valid, so any exception is unclear);
    ``repro``: a one-line reproducer; ``cause``: a label grouping the non-ok cases.
    """

    entry: str
    name: str
    fn: Callable[[], Any]
    names: tuple[str, ...] = ()
    repro: str = ""
    cause: str = ""


@dataclass
class Result:
    case: Case
    category: str
    detail: str = ""
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def classify(case: Case, exc: BaseException | None) -> tuple[str, str]:
    """The category and a one-line detail of ``case`` ending with ``exc`` (None: returned)."""
    if exc is None:
        return "ok", ""
    if isinstance(exc, Hang):
        return "hang", "exceeded the per-case timeout"
    msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    if isinstance(exc, Wrong):
        return "wrong", msg
    if not case.names:
        return "unclear", f"valid input raised {msg}"
    text = str(exc).lower()
    if isinstance(exc, CLEAR_TYPES) and any(n.lower() in text for n in case.names):
        return "clear", msg
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    loc = f" (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})" if where else ""
    return "unclear", f"{msg}{loc}; expected a message naming {list(case.names)}"


def _run_with_timer(fn: Callable[[], Any], timeout: float) -> BaseException | None:
    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        fn()
        return None
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        return e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _run_in_thread(fn: Callable[[], Any], timeout: float) -> BaseException | None:
    box: list[BaseException | None] = [Hang()]

    def target() -> None:
        try:
            fn()
            box[0] = None
        except BaseException as e:
            box[0] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    return Hang() if t.is_alive() else box[0]


def run_case(case: Case, timeout: float) -> Result:
    """Run ``case`` with a timeout (a timer signal in the main thread, else a daemon thread)."""
    start = time.perf_counter()
    main = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    exc = (_run_with_timer if main else _run_in_thread)(case.fn, timeout)
    category, detail = classify(case, exc)
    return Result(case, category, detail, time.perf_counter() - start)


def write_report(results: Iterable[Result], command: str, md_path: str, json_path: str) -> str:
    """Counts per category and per entry point, the non-ok non-clear cases grouped by cause."""
    results = list(results)
    total = Counter(r.category for r in results)
    entries = sorted({r.case.entry for r in results})
    lines = [
        "# Reliability audit",
        "",
        f"Produced by `{command}` (seeded; the same command gives the same table).",
        "",
        "| entry point | " + " | ".join(CATEGORIES) + " | total |",
        "|---|" + "---:|" * (len(CATEGORIES) + 1),
    ]
    for e in entries:
        c = Counter(r.category for r in results if r.case.entry == e)
        lines.append(
            f"| {e} | " + " | ".join(str(c[k]) for k in CATEGORIES) + f" | {sum(c.values())} |"
        )
    lines.append(
        "| **all** | "
        + " | ".join(f"**{total[k]}**" for k in CATEGORIES)
        + f" | **{len(results)}** |"
    )
    lines += [
        "",
        "Categories: see `benchmarks/_audit.py` (ok, clear error, unclear crash, silent wrong, hang).",
        "",
    ]
    bad = [r for r in results if r.category in ("unclear", "wrong", "hang")]
    lines.append(f"## Unclear crashes, silent wrong results and hangs ({len(bad)})")
    by_cause: dict[str, list[Result]] = {}
    for r in bad:
        by_cause.setdefault(r.case.cause or r.case.entry, []).append(r)
    for cause in sorted(by_cause):
        lines += ["", f"### {cause} ({len(by_cause[cause])})", ""]
        for r in by_cause[cause]:
            lines.append(f"- **{r.category}** `{r.case.entry}` {r.case.name}: {r.detail}")
            if r.case.repro:
                lines.append(f"  `{r.case.repro}`")
    text = "\n".join(lines) + "\n"
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(text)
    rows = [
        {
            "entry": r.case.entry,
            "case": r.case.name,
            "category": r.category,
            "detail": r.detail,
            "cause": r.case.cause,
            "repro": r.case.repro,
            "seconds": round(r.seconds, 4),
        }
        for r in results
    ]
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump({"command": command, "counts": dict(total), "cases": rows}, f, indent=1)
    return text
