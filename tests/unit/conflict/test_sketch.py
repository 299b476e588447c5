"""Seeded random projection of task-stacked gradients (gradfn.conflict.sketch)."""

import pytest
import torch

from gradfn.conflict import count_sketch_hashes, projection_block, sketch


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
    s = sketch(tree, 64, seed=5, method="rademacher")
    p = dense_projection(tree, 64, 5)
    torch.testing.assert_close(s, flat(tree) @ p, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        sketch(tree, 64, seed=5, chunk=13, method="rademacher"), s, atol=1e-4, rtol=1e-4
    )
    assert torch.equal(sketch(tree, 64, seed=5, method="rademacher"), s)  # deterministic
    assert not torch.allclose(sketch(tree, 64, seed=6, method="rademacher"), s)


def dense_count_sketch(tree, dim, seed):
    """CountSketch written out as an explicit (n, dim) matrix: one ±1 per coordinate."""
    blocks = []
    for index, name in enumerate(sorted(tree)):
        n = tree[name][0].numel()
        bucket, sign = count_sketch_hashes(seed, index, torch.arange(n), dim)
        block = torch.zeros(n, dim)
        block[torch.arange(n), bucket] = sign
        blocks.append(block)
    return torch.cat(blocks)


def test_count_sketch_is_the_linear_map_and_chunking_does_not_matter():
    tree = stacked()
    s = sketch(tree, 64, seed=5)
    torch.testing.assert_close(
        s, flat(tree) @ dense_count_sketch(tree, 64, 5), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(sketch(tree, 64, seed=5, chunk=17), s, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(sketch(tree, 64, seed=6), s)


def test_count_sketch_inner_products_are_unbiased():
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(2, 400, generator=g)
    rows[1] = 0.6 * rows[0] + 0.8 * rows[1]
    true = float(rows[0] @ rows[1])
    estimates = []
    for seed in range(300):
        s = sketch({"w": rows}, 16, seed=seed)
        estimates.append(float(s[0] @ s[1]))
    mean = sum(estimates) / len(estimates)
    # standard error of the mean over 300 seeds is ≈ sqrt(2·400/16)/sqrt(300) ≈ 0.4 of ~240
    assert abs(mean - true) < 0.05 * abs(true)
    buckets, signs = count_sketch_hashes(0, 0, torch.arange(20000), 16)
    assert abs(float((signs > 0).float().mean()) - 0.5) < 0.02
    counts = torch.bincount(buckets, minlength=16).float()
    assert float((counts / counts.mean() - 1).abs().max()) < 0.1


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

    def cos(x):
        n = x / x.norm(dim=1, keepdim=True)
        return n @ n.T

    for method in ("countsketch", "rademacher"):
        s = sketch({"w": rows}, 512, seed=0, method=method)
        assert float((cos(s) - cos(rows)).abs().max()) < 0.15


def test_bad_inputs():
    with pytest.raises(ValueError, match="dim"):
        sketch(stacked(), 0)
    with pytest.raises(ValueError, match="chunk"):
        sketch(stacked(), 4, chunk=0)
    with pytest.raises(ValueError, match="method"):
        sketch(stacked(), 4, method="gaussian")


def test_compiles_fullgraph():
    tree = stacked(k=2)
    for method in ("countsketch", "rademacher"):
        f = torch.compile(
            lambda t, m=method: sketch(t, 16, seed=3, chunk=256, method=m),
            fullgraph=True,
            backend="aot_eager",
        )
        torch.testing.assert_close(f(tree), sketch(tree, 16, seed=3, chunk=256, method=method))
