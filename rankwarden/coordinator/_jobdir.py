"""The job directory: per-rank logs per attempt, events.jsonl, spec.json, result.json.

    <job_dir>/spec.json
    <job_dir>/events.jsonl                 one JSON object per lifecycle event
    <job_dir>/attempt_001/rank_0.stdout    each rank's output, per attempt
    <job_dir>/attempt_001/rank_0.stderr
    <job_dir>/result.json                  the final snapshot, written at the end

Events are appended synchronously with a flush per line: they are few (not
heartbeats), ordering matters more than latency, and a line must be on disk
before the coordinator acts on the event it describes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

import msgspec

__all__ = ["JobDir"]


class JobDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).absolute()
        self._events: IO[bytes] | None = None

    def prepare(self, spec_json: bytes) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "spec.json").write_bytes(spec_json)
        self._events = open(self.path / "events.jsonl", "ab")

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    def attempt_dir(self, attempt: int) -> Path:
        return self.path / f"attempt_{attempt:03d}"

    def log_paths(self, rank: int, attempt: int) -> tuple[Path, Path]:
        base = self.attempt_dir(attempt)
        return base / f"rank_{rank}.stdout", base / f"rank_{rank}.stderr"

    def append_event(self, line: bytes) -> None:
        if self._events is not None:
            self._events.write(line + b"\n")
            self._events.flush()

    def write_result(self, result: object) -> None:
        tmp = self.path / "result.json.tmp"
        tmp.write_bytes(msgspec.json.format(msgspec.json.encode(result)))
        os.replace(tmp, self.path / "result.json")

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
