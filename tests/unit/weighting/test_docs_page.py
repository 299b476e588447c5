"""The loss-weighting guide lists every method with its real hyper-parameters and defaults."""

from __future__ import annotations

import inspect
import re

import gradfn.weighting as W
from tests._utils import ROOT


def test_every_method_is_on_the_page_with_its_defaults():
    text = (ROOT / "docs" / "weighting.md").read_text(encoding="utf-8")
    rows = {}
    for line in text.splitlines():
        m = re.match(r'\| `"(\w+)"` \|[^|]*\| ([^|]*) \|', line)
        if m:
            rows[m.group(1)] = dict(re.findall(r"`(\w+)=([^`]+)`", m.group(2)))
    assert set(rows) == set(W.METHODS)
    for name, documented in rows.items():
        factory = getattr(W, name)
        sig = {k: p.default for k, p in inspect.signature(factory).parameters.items()}
        assert set(documented) == set(sig), name
        for k, v in documented.items():
            assert eval(v) == sig[k], (name, k)
