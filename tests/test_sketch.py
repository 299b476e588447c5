"""Seeded random projection of task-stacked gradients (gradfn.sketch)."""

import pytest
import torch

from gradfn.sketch import projection_block, sketch


def stacked(k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(k, 30, 20, generator=g),
        "a.bias": torch.randn(k, 30, generator=g),
        "b": torch.randn(k, 7, generator=g),
    }


def dense_projection(tree, dim, seed):
    """The projection written out as one explicit matrix (leaves in optree's sorted-key order)."""
    blocks = []
    for index, name in enumerate(sorted(tree)):
        n = tree[name][0].numel()
        blocks.append(projection_block(seed, index, torch.arange(n), dim))
    return torch.cat(blocks)


def flat(tree):
    return torch.cat([tree[n].reshape(tree[n].shape[0], -1) for n in sorted(tree)], dim=1)


def test_sketch_is_the_linear_map_p_and_chunking_does_not_matter():
    tree = stacked()
    s = sketch(tree, 64, seed=5)
    p = dense_projection(tree, 64, 5)
    torch.testing.assert_close(s, flat(tree) @ p, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sketch(tree, 64, seed=5, chunk=13), s, atol=1e-4, rtol=1e-4)
    assert torch.equal(sketch(tree, 64, seed=5), s)  # deterministic
    assert not torch.allclose(sketch(tree, 64, seed=6), s)


def test_projection_entries_are_scaled_signs():
    p = projection_block(0, 0, torch.arange(4000), 32)
    assert set(torch.unique(torch.round(p * 32**0.5)).tolist()) == {-1.0, 1.0}
    assert abs(float((p > 0).float().mean()) - 0.5) < 0.02
    # columns nearly orthogonal: PᵀP ≈ (n/dim) I
    gram = p.T @ p / (4000 / 32)
    assert float((gram - torch.eye(32)).abs().max()) < 0.15


def test_sketch_preserves_cosines_approximately():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 5000, generator=g)
    noise = torch.randn(4, 5000, generator=g)
    rows = torch.cat([base + 0.5 * noise[:2], -base + 0.5 * noise[2:]])  # two opposed pairs
    s = sketch({"w": rows}, 512, seed=0)

    def cos(x):
        n = x / x.norm(dim=1, keepdim=True)
        return n @ n.T

    assert float((cos(s) - cos(rows)).abs().max()) < 0.15


def test_bad_inputs():
    with pytest.raises(ValueError, match="dim"):
        sketch(stacked(), 0)
    with pytest.raises(ValueError, match="chunk"):
        sketch(stacked(), 4, chunk=0)


def test_compiles_fullgraph():
    tree = stacked(k=2)
    f = torch.compile(
        lambda t: sketch(t, 16, seed=3, chunk=256), fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(f(tree), sketch(tree, 16, seed=3, chunk=256))
