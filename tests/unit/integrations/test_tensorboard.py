"""``gradfn.integrations.tensorboard``: SON-GOKU's interference matrix and schedule timeline as
images. The cells are located through the figures' own axes transforms and their pixels read
back from the rendered image; the event file is read back with TensorBoard's EventAccumulator."""

from __future__ import annotations

import sys

import pytest
import torch

from gradfn.adapters import SonGokuScheduler
from gradfn.algorithms import songoku
from gradfn.integrations import _figures
from gradfn.integrations import tensorboard as tb
from tests._utils.models import TrunkHeads
from tests.unit.adapters._problems import abc_batches, abc_specs
from tests.unit.algorithms.songoku._linear import batches, linear_loss, make_params, planted


def _pixel(fig, img, ax, col: float, row: float) -> torch.Tensor:
    """The RGB of the image at data point (x=col, y=row) of ``ax`` (display y is from below)."""
    x, y = ax.transData.transform((col, row))
    h = img.shape[1]
    return img[:, round(float(h - y)), round(float(x))]


def _reddish(rgb: torch.Tensor) -> bool:
    return int(rgb[0]) > int(rgb[2]) + 40


def _bluish(rgb: torch.Tensor) -> bool:
    return int(rgb[2]) > int(rgb[0]) + 40


RHO3 = torch.tensor([[0.0, 0.8, -0.6], [0.8, 0.0, -0.5], [-0.6, -0.5, 0.0]])


def test_interference_cells_follow_the_matrix_and_frame_the_conflicts():
    conflict = RHO3 > 0.3
    fig = _figures.interference_figure(RHO3, 0.3, conflict, ["a", "b", "c"])
    img = _figures.figure_to_image(fig)
    assert img.dtype == torch.uint8 and img.dim() == 3 and img.shape[0] == 3
    w, h = fig.canvas.get_width_height()
    assert img.shape[1:] == (h, w)
    ax = fig.axes[0]
    # the conflicting pair (0, 1) is red (ρ > 0), the aligned pairs blue, the diagonal grey
    for i, j in [(0, 1), (1, 0)]:
        assert _reddish(_pixel(fig, img, ax, j + 0.25, i + 0.25))
    for i, j in [(0, 2), (2, 0), (1, 2), (2, 1)]:
        assert _bluish(_pixel(fig, img, ax, j + 0.25, i + 0.25))
    for i in range(3):
        r, g, b = (int(v) for v in _pixel(fig, img, ax, i + 0.25, i + 0.25))
        assert abs(r - g) < 5 and abs(g - b) < 5 and 150 < r < 230
    # the frame: black at the edge of the conflicting cell only
    frame = lambda i, j: _pixel(fig, img, ax, j - 0.46, i)
    assert int(frame(0, 1).max()) < 60 and int(frame(1, 0).max()) < 60
    assert int(frame(0, 2).max()) > 100 and int(frame(2, 1).max()) > 100


def test_interference_image_of_a_state_matches_its_figure_and_checks_input():
    dirs, _ = planted(k_per_group=2, groups=2)  # tasks 0-1 against 2-3
    tx = songoku(linear_loss(dirs), num_tasks=4, refresh_period=2)
    params = make_params(4)
    state = tx.init(params)
    for batch in batches(4, 2):
        state, _ = tx.update(state, params, batch)
    assert int(state.refreshes) == 1 and float(state.rho[0, 2]) > 0.3
    names = ["w", "x", "y", "z"]
    img = tb.interference_image(state, names)
    assert img.dtype == torch.uint8 and img.shape[0] == 3
    fig = tb.interference_figure(state, names)
    assert torch.equal(_figures.figure_to_image(fig), img)
    ax = fig.axes[0]
    for i in range(4):
        for j in range(4):
            if i != j and abs(float(state.rho[i, j])) > 0.3:
                colour = _pixel(fig, img, ax, j + 0.3, i + 0.3)
                assert (_reddish if state.rho[i, j] > 0 else _bluish)(colour), (i, j)
    with pytest.raises(TypeError, match="source"):
        tb.interference_image(None)
    with pytest.raises(ValueError, match="task_names"):
        tb.interference_image(state, ["a"])


def _record(active_rows, refreshes=None, skipped=()):
    """A recorder fed fake states with the given active masks."""
    dirs, _ = planted(k_per_group=2, groups=2)
    state = songoku(linear_loss(dirs), num_tasks=4, refresh_period=2).init(make_params(4))
    rec = tb.ScheduleRecorder(capacity=8)
    for s, row in enumerate(active_rows):
        rec.record(
            state._replace(
                active=torch.tensor(row, dtype=torch.bool),
                step=torch.tensor(s + 1),
                skipped=torch.tensor(s in skipped),
                refreshes=torch.tensor(0 if refreshes is None else refreshes[s]),
            )
        )
    return rec


def test_schedule_recorder_is_bounded_and_reports_the_window():
    rows = [[1, 0, 1, 0], [0, 1, 0, 1]] * 6  # 12 steps, capacity 8
    rec = _record(rows, refreshes=[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2])
    assert len(rec) == 8
    t = rec.timeline()
    assert t["step"].tolist() == list(range(5, 13))
    assert t["active"].tolist() == [[bool(v) for v in r] for r in rows[4:]]
    assert t["refreshed"].tolist() == [False, True, False, False, False, False, True, False]
    rec.clear()
    assert len(rec) == 0
    with pytest.raises(ValueError, match="empty"):
        rec.timeline()
    with pytest.raises(ValueError, match="capacity"):
        tb.ScheduleRecorder(0)
    three, _ = planted(k_per_group=1, groups=3)
    rec = _record(rows[:1])
    with pytest.raises(ValueError, match="tasks"):
        rec.record(songoku(linear_loss(three), num_tasks=3).init(make_params(3)))


def test_schedule_image_marks_the_active_tasks_of_each_step():
    rows = [[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0], [1, 0, 1, 1]]
    rec = _record(rows, skipped=(4,))
    fig = tb.schedule_figure(rec, list("abcd"))
    img = tb.schedule_image(rec, list("abcd"))
    assert img.dtype == torch.uint8 and img.shape[0] == 3
    assert torch.equal(_figures.figure_to_image(fig), img)
    ax = fig.axes[0]
    colours = {}
    for s, row in enumerate(rows):
        for k, on in enumerate(row):
            rgb = tuple(int(v) for v in _pixel(fig, img, ax, s, k))
            if s == 4:  # skipped: grey everywhere
                assert max(rgb) - min(rgb) < 5 and 200 < rgb[0] < 230, (s, k, rgb)
            elif on:
                assert rgb != (255, 255, 255), (s, k)
                colours.setdefault(tuple(rows[s]), set()).add(rgb)
            else:
                assert rgb == (255, 255, 255), (s, k, rgb)
    # one colour per distinct group, the same at each of its steps; distinct groups differ
    assert all(len(c) == 1 for c in colours.values())
    assert len({next(iter(c)) for c in colours.values()}) == len(colours) == 3


def test_log_to_tensorboard_writes_the_tags_read_back_from_the_event_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    model = TrunkHeads(6, 8, 3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = SonGokuScheduler(model, abc_specs(), opt, refresh_period=2)
    rec = tb.ScheduleRecorder(capacity=16)
    with pytest.raises(TypeError, match="source"):
        rec.record(sched)  # before its first step
    writer = tb.summary_writer(str(tmp_path))
    for s, batch in enumerate(abc_batches(4)):
        sched.step(batch)
        rec.record(sched)
        tb.log_to_tensorboard(writer, sched, recorder=rec, images=s == 3)
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert set(tags["images"]) == {"songoku/interference", "songoku/schedule"}
    assert {"songoku/tau", "songoku/loss/a", "songoku/active/c"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("songoku/step")] == [1, 2, 3, 4]
    (event,) = acc.Images("songoku/schedule")
    want = tb.schedule_image(rec, sched.names)
    assert event.step == 4 and (event.width, event.height) == (want.shape[2], want.shape[1])
    with pytest.raises(TypeError, match="writer"):
        tb.log_to_tensorboard(object(), sched)
    with pytest.raises(TypeError, match="recorder"):
        tb.log_to_tensorboard(writer, sched, recorder=[])


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"gradfn\[tensorboard\]"):
        _figures.interference_figure(RHO3, 0.3, RHO3 > 0.3)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"gradfn\[tensorboard\]"):
        tb.summary_writer()
