"""Progress bars for the long-running commands: tqdm on stderr, with the estimated time left.

Shown by default when stderr is a terminal (and tqdm is installed: ``pip install -e ".[bench]"``),
never when it is redirected to a file or a pipe; ``--progress`` forces it on, ``--no-progress``
off. While a bar is shown, lines printed to stdout go through ``tqdm.write`` (the bar is redrawn
below them), so stdout receives exactly the same text as without a bar.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["Progress", "add_progress_arg", "enabled", "progress", "set_default"]

T = TypeVar("T")
_DEFAULT: bool | None = None  # None: on when stderr is a terminal


def add_progress_arg(parser: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--no-progress`` (default: on when stderr is a terminal)."""
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars with the time left, on stderr (default: when stderr is a terminal)",
    )


def set_default(flag: bool | None) -> None:
    """The choice of ``--progress`` / ``--no-progress`` for every bar of this process."""
    global _DEFAULT
    _DEFAULT = flag


def _tqdm() -> Any:
    try:
        import tqdm
    except ImportError:
        return None
    return tqdm


def enabled(flag: bool | None = None) -> bool:
    """Whether to draw a bar: ``flag``, else the process default, else stderr is a terminal."""
    flag = _DEFAULT if flag is None else flag
    if flag is None:
        return sys.stderr.isatty() and _tqdm() is not None
    if flag and _tqdm() is None:
        raise SystemExit("--progress needs tqdm: pip install -e '.[bench]'")
    return flag


class Progress:
    """A context manager counting ``total`` units of work; a tqdm bar on stderr when enabled.

    ``n`` counts the units done whether or not a bar is drawn. ``leave=False``: the bar is erased
    when it closes (for inner bars).
    """

    def __init__(
        self, total: int, desc: str = "", *, enable: bool | None = None, leave: bool = True
    ) -> None:
        self.total, self.n = total, 0
        self.enabled = enabled(enable)
        self._bar: Any = None
        self._stdout: Any = None
        self._desc, self._leave = desc, leave

    def __enter__(self) -> Progress:
        if self.enabled:
            tqdm = _tqdm()
            from tqdm.contrib import DummyTqdmFile

            if not isinstance(sys.stdout, DummyTqdmFile):  # the outermost bar redirects stdout
                self._stdout = sys.stdout
                sys.stdout = DummyTqdmFile(sys.stdout)
            self._bar = tqdm.tqdm(
                total=self.total,
                desc=self._desc,
                file=sys.stderr,
                leave=self._leave,
                dynamic_ncols=True,
                smoothing=0.1,
            )
        return self

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)

    def __exit__(self, *exc: object) -> None:
        if self._stdout is not None:
            wrapper: Any = sys.stdout
            sys.stdout, self._stdout = self._stdout, None
            rest = "".join(wrapper._buf)  # a last line without its newline
            wrapper._buf = []
            if rest:
                sys.stdout.write(rest)
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def progress(
    items: Iterable[T], desc: str = "", *, enable: bool | None = None, leave: bool = True
) -> Iterator[T]:
    """Iterate over ``items`` (materialised, to know the total) with a :class:`Progress` bar."""
    items = list(items)
    with Progress(len(items), desc, enable=enable, leave=leave) as bar:
        for item in items:
            yield item
            bar.update()
