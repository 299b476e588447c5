"""Shared test configuration: hypothesis profiles sized for a 2-core CI machine, fixtures, and
gradfn's own deprecation warnings turned into errors outside the tests that exercise the 0.1 names
(``tests/integration/test_deprecations.py``)."""

import io
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# the messages of gradfn's DeprecationWarnings (0.1 names and module paths, 0.1 options)
GRADFN_DEPRECATION = (
    r"(\S+ is deprecated since gradfn"
    r"|(songoku|conductor)\(\w+=\.\.\.\) is deprecated"
    r"|as_\w*gradient_transform is deprecated)"
)
# files that may use deprecated names: the deprecation tests, and code this suite does not own
DEPRECATIONS_ALLOWED = ("test_deprecations.py", "test_quality_quick.py", "test_examples.py")


def pytest_collection_modifyitems(config, items):
    error = pytest.mark.filterwarnings(f"error:{GRADFN_DEPRECATION}:DeprecationWarning")
    for item in items:
        if item.path.name not in DEPRECATIONS_ALLOWED:
            item.add_marker(error)


@pytest.fixture
def roundtrip():
    """``roundtrip(obj)``: ``obj`` through ``torch.save`` and ``torch.load(weights_only=True)``."""

    def save_and_load(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=True)

    return save_and_load
