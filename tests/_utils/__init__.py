"""Helpers shared by the test suite: one model family (:mod:`.models`), naive oracles
(:mod:`.oracles`) and pytree assertions (:mod:`.asserts`)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
