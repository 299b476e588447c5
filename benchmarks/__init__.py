"""Benchmarks of gradfn: speed scripts and the quality harness (``python -m benchmarks.quality``)."""
