"""TensorBoard images of SON-GOKU's decisions (arXiv:2509.16959): the interference matrix and
the schedule timeline (``pip install 'gradfn[tensorboard]'``: tensorboard and matplotlib).

* :func:`interference_image`: the last refresh's ``ρ_ij = −cos(e_i, e_j)`` between the tasks'
  gradient EMAs (``(K, K)``), on a diverging scale, the conflict edges (``ρ > τ``) framed and
  ``τ`` marked on the colour bar.
* :class:`ScheduleRecorder` and :func:`schedule_image`: which tasks ran at each of the last
  ``capacity`` steps, coloured by group, with the refreshes marked. The recorder keeps a bounded
  window (a ``deque``) of small device tensors: recording reads nothing from the host.
* :func:`log_to_tensorboard`: :func:`~gradfn.integrations.logging.songoku_metrics` as scalars
  and the two images, into a ``SummaryWriter`` (or anything with ``add_scalar`` and
  ``add_image``); :func:`summary_writer` makes one.

Images are ``(3, H, W)`` uint8 tensors (``dataformats="CHW"``), rendered with matplotlib's Agg
canvas; ``interference_figure`` / ``schedule_figure`` return the matplotlib figures themselves.
Rendering takes tens of milliseconds: log images every few hundred steps, or at each refresh.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gradfn._internal import checks
from gradfn.integrations import _figures
from gradfn.integrations.logging import songoku_metrics

if TYPE_CHECKING:
    from gradfn.algorithms import SonGokuState

__all__ = [
    "ScheduleRecorder",
    "interference_figure",
    "interference_image",
    "log_to_tensorboard",
    "schedule_figure",
    "schedule_image",
    "summary_writer",
]


def _state(source: Any) -> SonGokuState:
    """A ``SonGokuState``, or the ``.state`` of a ``SonGokuScheduler``."""
    from gradfn.algorithms import SonGokuState

    state = source if isinstance(source, SonGokuState) else getattr(source, "state", None)
    if not isinstance(state, SonGokuState):
        what = type(source).__name__ if state is None else type(state).__name__
        raise TypeError(
            "`source` must be a SonGokuState or a SonGokuScheduler after its first step, "
            f"got {what}"
        )
    return state


def _default_names(source: Any, task_names: Sequence[str] | None) -> Sequence[str] | None:
    return task_names if task_names is not None else getattr(source, "names", None)


def summary_writer(log_dir: str | None = None, **kwargs: Any) -> Any:
    """``torch.utils.tensorboard.SummaryWriter(log_dir, **kwargs)``, or an ImportError naming
    the ``tensorboard`` extra when the tensorboard package is missing."""
    module = _figures.require("torch.utils.tensorboard")
    return module.SummaryWriter(log_dir, **kwargs)


def interference_figure(source: Any, task_names: Sequence[str] | None = None) -> Any:
    """The last refresh's interference matrix as a matplotlib ``Figure`` (see
    :func:`interference_image`)."""
    state = _state(source)
    title = f"step {int(state.step)}, refresh {int(state.refreshes)}: "
    return _figures.interference_figure(
        state.rho, float(state.tau), state.adjacency, _default_names(source, task_names), title
    )


def interference_image(source: Any, task_names: Sequence[str] | None = None) -> Tensor:
    """SON-GOKU's interference matrix as a ``(3, H, W)`` uint8 image.

    Args:
        source: a :class:`~gradfn.algorithms.SonGokuState`, or a ``SonGokuScheduler`` after its
            first step (its ``names`` label the tasks).
        task_names: the ``K`` task names (default: the scheduler's, or the indices).

    Cell ``(i, j)`` is ``ρ_ij = −cos(e_i, e_j)`` of the tasks' gradient EMAs at the last refresh
    (red: opposed, blue: aligned, on ``[−1, 1]``; the diagonal grey), the cells of the conflict
    graph's edges (``ρ_ij > τ``) are framed in black, and ``τ`` is a line on the colour bar. Before
    the first refresh ``ρ`` is 0 and ``τ`` NaN.

    Raises:
        TypeError: ``source`` is neither (e.g. a scheduler before its first step).
        ImportError: matplotlib is missing (``pip install 'gradfn[tensorboard]'``).
    """
    return _figures.figure_to_image(interference_figure(source, task_names))


class ScheduleRecorder:
    """The last ``capacity`` steps of SON-GOKU's schedule: feed it every step.

    ``record(source)`` stores the state's ``active`` mask (the tasks of the step's group),
    ``skipped``, ``step`` and ``refreshes`` as one ``(K + 3,)`` int64 device tensor (no host
    read); older steps fall out of the window. :meth:`timeline` reads the window in one transfer.

    Args:
        capacity: steps kept (≥ 1).
    """

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = checks.check_int("capacity", capacity, 1)
        self._rows: deque[Tensor] = deque(maxlen=self.capacity)
        self._k: int | None = None

    def __len__(self) -> int:
        return len(self._rows)

    def record(self, source: Any) -> None:
        """Record the step ``source`` (a ``SonGokuState`` or a ``SonGokuScheduler``) just took."""
        state = _state(source)
        k = state.active.shape[0]
        if self._k is not None and k != self._k:
            raise ValueError(f"`source` has {k} tasks; this recorder holds {self._k}")
        self._k = k
        i64 = torch.int64
        self._rows.append(
            torch.cat(
                [
                    state.active.to(i64),
                    state.skipped.reshape(1).to(i64),
                    state.step.reshape(1).to(i64),
                    state.refreshes.reshape(1).to(i64),
                ]
            )
        )

    def clear(self) -> None:
        """Forget the recorded steps."""
        self._rows.clear()

    def timeline(self) -> dict[str, Tensor]:
        """The window, oldest first, on the CPU (one host read): ``step`` ``(n,)`` int64 (the
        state's ``step`` after each recorded step), ``active`` ``(n, K)`` bool, ``skipped``
        ``(n,)`` bool and ``refreshed`` ``(n,)`` bool (the step refreshed the groups; False for
        the oldest step, whose predecessor is not recorded)."""
        if not self._rows:
            raise ValueError("the recorder is empty: call record() after a step first")
        rows = torch.stack(list(self._rows)).cpu()
        k = rows.shape[1] - 3
        refreshes = rows[:, k + 2]
        refreshed = torch.zeros(rows.shape[0], dtype=torch.bool)
        refreshed[1:] = refreshes[1:] > refreshes[:-1]
        return {
            "step": rows[:, k + 1],
            "active": rows[:, :k].bool(),
            "skipped": rows[:, k].bool(),
            "refreshed": refreshed,
        }


def _check_recorder(recorder: Any) -> ScheduleRecorder:
    if not isinstance(recorder, ScheduleRecorder):
        raise TypeError(f"`recorder` must be a ScheduleRecorder, got {type(recorder).__name__}")
    return recorder


def schedule_figure(recorder: ScheduleRecorder, task_names: Sequence[str] | None = None) -> Any:
    """The recorded schedule timeline as a matplotlib ``Figure`` (see :func:`schedule_image`)."""
    t = _check_recorder(recorder).timeline()
    return _figures.schedule_figure(
        t["step"], t["active"], t["skipped"], t["refreshed"], task_names
    )


def schedule_image(recorder: ScheduleRecorder, task_names: Sequence[str] | None = None) -> Tensor:
    """The recorded schedule as a ``(3, H, W)`` uint8 image.

    Rows are the ``K`` tasks, columns the recorded steps (oldest left); a task's cell is coloured
    when it was in that step's group, one colour per distinct group in the window (inactive:
    white; a skipped step: light grey), and a dashed line follows each step that refreshed the
    groups.

    Raises:
        TypeError: ``recorder`` is not a :class:`ScheduleRecorder`.
        ValueError: it is empty, or ``task_names`` does not hold ``K`` distinct names.
        ImportError: matplotlib is missing (``pip install 'gradfn[tensorboard]'``).
    """
    return _figures.figure_to_image(schedule_figure(recorder, task_names))


def log_to_tensorboard(
    writer: Any,
    source: Any,
    step: int | None = None,
    *,
    task_names: Sequence[str] | None = None,
    recorder: ScheduleRecorder | None = None,
    prefix: str = "songoku/",
    scalars: bool = True,
    images: bool = True,
) -> None:
    """Write SON-GOKU's metrics and images to a TensorBoard ``writer``.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (or anything with ``add_scalar`` and
            ``add_image``).
        source: a ``SonGokuState`` or a ``SonGokuScheduler`` after its first step.
        step: the global step of the entries (default: the state's ``step``).
        task_names: the task names (default: the scheduler's, or the indices).
        recorder: a :class:`ScheduleRecorder` fed every step; with it, the timeline image too.
        prefix: prepended to every tag.
        scalars: write :func:`~gradfn.integrations.logging.songoku_metrics` (``add_scalar`` per
            key).
        images: write ``<prefix>interference`` (and ``<prefix>schedule`` with ``recorder``).

    Raises:
        TypeError: ``writer`` lacks ``add_scalar`` / ``add_image``, or ``source``, ``recorder``,
            ``step``, ``prefix`` have the wrong type.
    """
    if not (
        callable(getattr(writer, "add_scalar", None))
        and callable(getattr(writer, "add_image", None))
    ):
        raise TypeError(
            f"`writer` must have add_scalar and add_image (a SummaryWriter), got {type(writer).__name__}"
        )
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise TypeError(f"`step` must be an int or None, got {type(step).__name__}")
    checks.check_bool("scalars", scalars)
    checks.check_bool("images", images)
    if recorder is not None:
        _check_recorder(recorder)
    state = _state(source)
    names = _default_names(source, task_names)
    metrics = songoku_metrics(state, names, prefix)
    at = int(state.step) if step is None else step
    if scalars:
        for key, value in metrics.items():
            writer.add_scalar(key, value, at)
    if images:
        writer.add_image(
            f"{prefix}interference", interference_image(state, names), at, dataformats="CHW"
        )
        if recorder is not None and len(recorder):
            writer.add_image(
                f"{prefix}schedule", schedule_image(recorder, names), at, dataformats="CHW"
            )
