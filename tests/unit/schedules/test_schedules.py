"""τ(t) schedules (gradfn.schedules) against the SON-GOKU paper's formulas (arXiv:2509.16959),
written out by hand."""

import math

import pytest
import torch

from gradfn.schedules import TauSchedule, tau_value


def test_default_is_constant_quarter():
    s = TauSchedule()
    assert [s.value(t) for t in (0, 1, 32, 10_000)] == [0.25] * 4


def test_warmup_then_linear():
    s = TauSchedule("linear", tau_initial=1.0, tau_target=0.2, warmup_steps=10, anneal_duration=40)
    assert s.value(0) == 1.0 and s.value(9) == 1.0
    assert s.value(10) == pytest.approx(1.0)
    assert s.value(30) == pytest.approx(1.0 - 0.8 * 0.5)
    assert s.value(50) == pytest.approx(0.2) and s.value(500) == pytest.approx(0.2)


def test_cosine():
    s = TauSchedule("cosine", tau_initial=0.8, tau_target=0.0, warmup_steps=0, anneal_duration=100)
    assert s.value(25) == pytest.approx(0.8 + (0.0 - 0.8) * (1 - math.cos(math.pi / 4)) / 2)
    assert s.value(100) == pytest.approx(0.0, abs=1e-12)


def test_log_is_geometric():
    s = TauSchedule("log", tau_initial=1.0, tau_target=0.25, warmup_steps=5, anneal_duration=20)
    assert s.value(4) == 1.0
    assert s.value(15) == pytest.approx(1.0 * 0.25**0.5)  # p = 10/20
    assert s.value(25) == pytest.approx(0.25)


def test_constant_is_really_constant():
    s = TauSchedule("constant", tau_initial=1.0, tau_target=0.4, warmup_steps=10, anneal_duration=9)
    assert {s.value(t) for t in range(0, 40, 3)} == {0.4}


def test_zero_anneal_jumps_after_warmup():
    s = TauSchedule("cosine", tau_initial=1.0, tau_target=0.3, warmup_steps=3)
    assert [s.value(t) for t in range(5)] == [1.0, 1.0, 1.0, 0.3, 0.3]


@pytest.mark.parametrize("kind", ["log", "linear", "cosine", "constant"])
def test_tensor_t_matches_python_t(kind):
    s = TauSchedule(kind, tau_initial=0.9, tau_target=0.1, warmup_steps=4, anneal_duration=16)
    for t in (0, 3, 4, 5, 12, 20, 33):
        got = tau_value(s, torch.tensor(t))
        assert isinstance(got, torch.Tensor) and got.dim() == 0
        assert float(got) == pytest.approx(s.value(t), abs=1e-6)
        wide = tau_value(s, torch.tensor(t), dtype=torch.float64)
        assert wide.dtype == torch.float64 and float(wide) == pytest.approx(s.value(t), abs=1e-15)


def test_compiles_fullgraph():
    s = TauSchedule("log", tau_initial=1.0, tau_target=0.25, warmup_steps=4, anneal_duration=16)
    f = torch.compile(lambda t: tau_value(s, t), fullgraph=True, backend="aot_eager")
    assert float(f(torch.tensor(12))) == pytest.approx(s.value(12), abs=1e-6)


def test_bad_values():
    with pytest.raises(ValueError, match="kind"):
        TauSchedule("exp")
    with pytest.raises(ValueError, match="tau_target"):
        TauSchedule(tau_target=1.5)
    with pytest.raises(ValueError, match="tau_initial"):
        TauSchedule(tau_initial=float("nan"))
    with pytest.raises(ValueError, match="warmup_steps"):
        TauSchedule(warmup_steps=-1)
    with pytest.raises(ValueError, match="anneal_duration"):
        TauSchedule(anneal_duration=2.5)
    with pytest.raises(ValueError, match="log"):
        TauSchedule("log", tau_initial=1.0, tau_target=0.0, anneal_duration=10)
    with pytest.raises(TypeError, match="tau_target"):
        TauSchedule(tau_target="0.3")
    # log with τ* ≤ 0 is fine without an anneal (no interpolation happens)
    assert TauSchedule("log", tau_target=-0.1).value(7) == -0.1
