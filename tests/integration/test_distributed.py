"""gradfn.integrations.distributed on two real processes (gloo over loopback), against a by-hand
mean."""

import os

import pytest
import torch
import torch.distributed as dist

from gradfn.integrations.distributed import (
    all_reduce_mean,
    broadcast_tree,
    is_distributed,
    make_reducer,
    world_size,
)
from tests._utils.two_ranks import run_two_ranks


def _rank_tree(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return {
        "w": torch.randn(3, 5, generator=g),
        "half": torch.randn(7, generator=g).to(torch.bfloat16),
        "big": torch.randn(2, 300, generator=g, dtype=torch.float64),
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        tree = _rank_tree(rank)
        # a tiny bucket size forces several buckets
        mean = all_reduce_mean(tree, bucket_bytes=64)
        mean_default = make_reducer()(tree)
        same = broadcast_tree({"x": torch.full((2,), float(rank))}, src=1)
        torch.save(
            {
                "mean": mean,
                "mean_default": mean_default,
                "bcast": same,
                "ws": world_size(),
                "dist": is_distributed(),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_identity_without_process_group():
    tree = _rank_tree(0)
    assert all_reduce_mean(tree) is tree
    assert not is_distributed() and world_size() == 1
    with pytest.raises(TypeError, match="floating-point"):
        all_reduce_mean({"i": torch.ones(2, dtype=torch.int64)})
    with pytest.raises(ValueError, match="bucket_bytes"):
        all_reduce_mean(tree, bucket_bytes=0)


def test_two_ranks_average_in_float32_buckets():
    results = run_two_ranks(_worker)
    t0, t1 = _rank_tree(0), _rank_tree(1)
    for r in results:
        assert r["ws"] == 2 and r["dist"]
        for name in t0:
            expected = ((t0[name].double() + t1[name].double()) / 2).to(t0[name].dtype)
            for key in ("mean", "mean_default"):
                got = r[key][name]
                assert got.dtype == t0[name].dtype and got.shape == t0[name].shape
                torch.testing.assert_close(got, expected)
        assert torch.equal(r["bcast"]["x"], torch.ones(2))
    # both ranks hold identical results, bit for bit
    for name in t0:
        assert torch.equal(results[0]["mean"][name], results[1]["mean"][name])
