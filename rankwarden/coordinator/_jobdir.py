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
from typing import IO, NamedTuple

import msgspec

__all__ = ["JobDir", "OutputLine", "RankOutputTail"]


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


class OutputLine(NamedTuple):
    rank: int
    attempt: int
    stream: str  # "stdout" or "stderr"
    text: bytes


class RankOutputTail:
    """New lines of every rank's output files since the last call, file by file.

    Ranks write their output straight to files (it survives the coordinator);
    the CLI echoes it and the API numbers it for SSE by tailing them. Only
    complete lines are returned, unless ``final`` (the job has ended)."""

    _CHUNK = 1 << 20

    def __init__(self, job_dir: JobDir) -> None:
        self.job_dir = job_dir
        self.offsets: dict[str, int] = {}

    def read(self, ranks: list[tuple[int, int]], *, final: bool = False) -> list[OutputLine]:
        """``ranks``: (rank, newest attempt) pairs; every attempt up to it is read."""
        out: list[OutputLine] = []
        for rank, newest in ranks:
            for attempt in range(1, max(newest, 1) + 1):
                for path in self.job_dir.log_paths(rank, attempt):
                    out += self._read_file(path, rank, attempt, final)
        return out

    def _read_file(self, path: Path, rank: int, attempt: int, final: bool) -> list[OutputLine]:
        key = str(path)
        start = self.offsets.get(key, 0)
        try:
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(self._CHUNK)
        except FileNotFoundError:
            return []
        end = len(data) if final else data.rfind(b"\n") + 1
        if end <= 0:
            return []
        self.offsets[key] = start + end
        stream = path.suffix[1:]
        return [OutputLine(rank, attempt, stream, line) for line in data[:end].splitlines()]
