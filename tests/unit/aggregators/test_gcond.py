"""The ``gcond`` aggregator: GCond's resolution summed."""

from __future__ import annotations

import pytest

import gradfn.aggregators as A
from gradfn.conflict import resolve
from tests.unit.aggregators._common import CASES, F64, close, flat, jac, split


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rule", ["smooth", "zones"])
def test_gcond_is_the_sum_of_resolved_gradients(case, rule):
    seed, k, n = case
    j = jac(seed, k, n)
    grads = split(j)
    out = A.gcond(grads, rule=rule)
    ref = resolve(grads, gram_dtype=F64, rule=rule).grads
    close(flat(out.grad), flat({x: r.sum(0) for x, r in ref.items()}))
