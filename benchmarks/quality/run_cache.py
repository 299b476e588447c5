"""A resumable sweep: every finished run's record is appended to a JSON-lines file, keyed by
its full :class:`~benchmarks.quality.runner.RunSpec`, so that an interrupted protocol run
(``--resume``) continues where it stopped instead of starting again (the full protocol takes
hours on two cores)."""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.quality.runner import RunSpec, run_sweep

__all__ = ["RunCache", "spec_key"]


def spec_key(spec: RunSpec) -> str:
    """The identity of a run: every field of its spec (method configuration included)."""
    return json.dumps(asdict(spec), sort_keys=True)


class RunCache:
    """Records of finished runs in ``path`` (one JSON object per line: ``{"key", "record"}``).

    ``resume=False`` starts a new file; ``resume=True`` keeps the records already there, or, where
    ``path`` is absent, those of its committed compressed copy ``path.gz`` (:meth:`compress`).
    A truncated last line (a run killed mid-write) is ignored."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        packed = path.with_name(path.name + ".gz")
        if resume and not path.is_file() and packed.is_file():
            path.write_bytes(gzip.decompress(packed.read_bytes()))
        kept: list[str] = []
        if resume and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.records[entry["key"]] = entry["record"]
                kept.append(line)
        # rewritten with the readable lines only, so that new records never follow a torn one
        path.write_text("".join(line + "\n" for line in kept))

    def _add(self, spec: RunSpec, record: dict[str, Any]) -> None:
        key = spec_key(spec)
        # stored as read back, so that a resumed run sees exactly what a fresh one does
        line = json.dumps({"key": key, "record": record}, allow_nan=True)
        self.records[key] = json.loads(line)["record"]
        with self.path.open("a") as f:
            f.write(line + "\n")

    def compress(self) -> Path:
        """Write ``path.gz`` (reproducible bytes: no timestamp), the copy to commit."""
        packed = self.path.with_name(self.path.name + ".gz")
        packed.write_bytes(gzip.compress(self.path.read_bytes(), compresslevel=9, mtime=0))
        return packed

    def sweep(self, specs: list[RunSpec], **kwargs: Any) -> list[dict[str, Any]]:
        """The records of ``specs`` in order, running only those not recorded yet."""
        missing = [s for s in specs if spec_key(s) not in self.records]
        if len(missing) < len(specs):
            print(f"resuming: {len(specs) - len(missing)} of {len(specs)} runs already recorded")
        run_sweep(missing, on_record=self._add, **kwargs)
        return [self.records[spec_key(s)] for s in specs]
