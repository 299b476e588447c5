"""The adapters' policy for a task whose loss stays non-finite (docs: Reliability).

A non-finite loss of an active task skips the whole step, so a task that is always NaN would
stall every task: its group is retried forever. Both adapters warn (``RuntimeWarning``, once)
after :data:`STALL` consecutive skipped steps, naming the tasks whose loss was non-finite.
``SonGokuScheduler(quarantine_after=n)`` also quarantines a task whose loss was non-finite at
``n`` consecutive steps where it was active: from then on it is left out (no forward, no
gradient, its head gets ``p.grad = None``) and the other tasks of its group train; a warning
names it, ``scheduler.quarantined`` lists it and ``scheduler.release(name)`` takes it back.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from gradfn._internal import checks

__all__ = ["STALL", "Quarantine"]

STALL = 10  # consecutive skipped steps before the stall warning


class Quarantine:
    """Per-task streaks of non-finite losses, the quarantined tasks and the stall warning."""

    def __init__(self, names: Sequence[str], after: int | None, what: str = "step") -> None:
        self.names, self.what = list(names), what
        self.after = checks.check_optional_int("quarantine_after", after, 1)
        self.streak = [0] * len(self.names)
        self.skips = 0
        self.warned = False
        self.quarantined: list[str] = []

    def live(self, active: Sequence[int]) -> list[int]:
        """The active tasks that are not quarantined."""
        return [i for i in active if self.names[i] not in self.quarantined]

    def observe(self, active: Sequence[int], losses: Sequence[float], skipped: bool) -> None:
        """Count this step's non-finite losses of the ``active`` tasks; quarantine and warn."""
        bad = [i for i in active if not _finite(losses[i])]
        for i in active:
            self.streak[i] = self.streak[i] + 1 if (skipped and i in bad) else 0
        self.skips = self.skips + 1 if skipped else 0
        if self.after is not None:
            for i in active:
                name = self.names[i]
                if self.streak[i] >= self.after and name not in self.quarantined:
                    self.quarantined.append(name)
                    warnings.warn(
                        f"task {name!r} is quarantined: its loss was non-finite at "
                        f"{self.streak[i]} consecutive steps; the other tasks train on without "
                        "it (release(name) takes it back)",
                        RuntimeWarning,
                        stacklevel=4,
                    )
        if self.skips >= STALL and not self.warned:
            self.warned = True
            culprits = [self.names[i] for i in bad] or "none (a non-finite gradient)"
            hint = "" if self.after is not None else "; see quarantine_after"
            warnings.warn(
                f"{self.skips} consecutive {self.what}s were skipped (non-finite losses: "
                f"{culprits}): no task is training{hint}",
                RuntimeWarning,
                stacklevel=4,
            )

    def release(self, name: str) -> None:
        """Take a quarantined task back (``ValueError`` for a task that is not quarantined)."""
        if name not in self.quarantined:
            raise ValueError(
                f"`name`: {name!r} is not quarantined (quarantined: {self.quarantined})"
            )
        self.quarantined.remove(name)
        self.streak[self.names.index(name)] = 0

    def load(self, names: object) -> None:
        """Restore the quarantined task names of a checkpoint (None: none)."""
        if names is None:
            names = []
        if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
            raise ValueError("load_state_dict: `quarantined` must be a list of task names")
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise ValueError(f"load_state_dict: `quarantined` names unknown tasks {unknown}")
        self.quarantined = list(names)
        self.streak, self.skips = [0] * len(self.names), 0


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))
