"""Task-stacked input is never misread: a top-level list or tuple of alike entries (``K``
per-task gradients, the common mistake) is rejected by every public entry point with a message
that says how to pass them, and the forms it names give the result of ``torch.stack``.

``pcgrad([torch.randn(5), torch.randn(5)])`` used to be read as a two-leaf pytree with ``K = 5``
and returned 5 weights."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import pytest
import torch

import gradfn.aggregators as A
from gradfn import tree
from tests.unit.aggregators._common import F64, jac

PURE = {
    "mean": A.mean,
    "sum_": A.sum_,
    "pcgrad": A.pcgrad,
    "graddrop": A.graddrop,
    "cagrad": A.cagrad,
    "mgda": A.mgda,
    "upgrad": A.upgrad,
    "dualproj": A.dualproj,
    "imtl_g": A.imtl_g,
    "aligned_mtl": A.aligned_mtl,
    "config": A.config,
    "gcond": A.gcond,
}
K, N = 3, 7


def per_task_flat() -> list[torch.Tensor]:
    return list(jac(5, K, N).unbind(0))


def per_task_trees() -> list[dict[str, torch.Tensor]]:
    """``K`` per-task pytrees: a (2, 3) weight and a (1,) bias, 7 entries each."""
    return [{"w": g[:6].reshape(2, 3), "b": g[6:]} for g in per_task_flat()]


AMBIGUOUS = {
    "list of 1-D": lambda: per_task_flat(),
    "tuple of 1-D": lambda: tuple(per_task_flat()),
    "list of 2-D": lambda: [g[:6].reshape(2, 3) for g in per_task_flat()],
    "list of dicts": per_task_trees,
    "list of tuples": lambda: [(t["w"], t["b"]) for t in per_task_trees()],
}
MATCH = r"ambiguous.*torch\.stack\(grads\).*gradfn\.tree\.stack\(grads\).*dict"


def test_the_reported_input_is_rejected():
    with pytest.raises(ValueError, match=r"pcgrad: .*2 task gradients or as a task-stacked pytree"):
        A.pcgrad([torch.randn(5), torch.randn(5)])


@pytest.mark.parametrize("form", AMBIGUOUS)
@pytest.mark.parametrize("name", PURE)
def test_pure_functions_reject_a_sequence_of_per_task_gradients(name, form):
    with pytest.raises(ValueError, match=name + ": .*" + MATCH):
        PURE[name](AMBIGUOUS[form]())


@pytest.mark.parametrize("form", AMBIGUOUS)
@pytest.mark.parametrize("method", A.METHODS)
def test_aggregators_reject_it_in_init_and_update(method, form):
    agg = A.aggregator(method)
    with pytest.raises(ValueError, match=MATCH):
        agg.init(AMBIGUOUS[form]())
    state = agg.init(K)
    with pytest.raises(ValueError, match=MATCH):
        agg.update(state, AMBIGUOUS[form]())


@pytest.mark.parametrize("method", ["upgrad", "pcgrad"])
def test_deprecated_transforms_reject_it(method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if method == "upgrad":
            transform = A.as_gradient_transform(method)
            with pytest.raises(ValueError, match=MATCH):
                transform(per_task_flat())
        else:
            init, transform = A.as_stateful_gradient_transform(method)
            with pytest.raises(ValueError, match=MATCH):
                transform(init(K), per_task_flat())


def _flat(grad) -> torch.Tensor:
    if isinstance(grad, torch.Tensor):
        return grad.reshape(-1)
    if isinstance(grad, dict) and set(grad) == {"w", "b"}:
        grad = (grad["w"], grad["b"])  # the per-task layout: weight first
    return torch.cat([x.reshape(-1) for x in tree.leaves(grad)])


def _correct_forms() -> dict[str, object]:
    flat, trees = per_task_flat(), per_task_trees()
    stacked = tree.stack(trees)
    return {
        "dict of one stacked leaf": {"g": torch.stack(flat)},
        "tree.stack of per-task dicts": stacked,
        # task-stacked leaves of different shapes: one reading only, still accepted
        "tuple of task-stacked leaves": (stacked["w"], stacked["b"]),
        "list of task-stacked leaves": [stacked["w"], stacked["b"]],
    }


@pytest.mark.parametrize("form", list(_correct_forms()))
@pytest.mark.parametrize("method", A.METHODS)
def test_the_correct_forms_match_torch_stack(method, form):
    ref_agg, agg = A.aggregator(method), A.aggregator(method)
    grads = _correct_forms()[form]
    stacked = torch.stack(per_task_flat())
    _, ref = ref_agg.update(ref_agg.init(stacked), stacked)
    _, out = agg.update(agg.init(grads), grads)
    assert out.weights.shape == (K,)
    if method != "graddrop":  # its random mask is drawn per leaf shape; its weights agree
        torch.testing.assert_close(_flat(out.grad), ref.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.weights, ref.weights, rtol=1e-9, atol=1e-12)


class Params(NamedTuple):
    w: torch.Tensor
    b: torch.Tensor


def test_a_named_tuple_of_alike_task_stacked_leaves_is_a_pytree():
    # the names say what it is: parameters, each task-stacked (no ambiguity to reject)
    j = jac(2, K, 10, dtype=F64)
    grads = Params(j[:, :5], j[:, 5:])
    out = A.upgrad(grads)
    torch.testing.assert_close(_flat(out.grad), A.upgrad(j).grad)
