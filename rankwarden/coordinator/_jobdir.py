"""The job directory: per-rank logs per attempt, events.jsonl, spec.json, result.json.

    <job_dir>/spec.json
    <job_dir>/events.jsonl                 one JSON object per lifecycle event
    <job_dir>/attempt_001/rank_0.stdout    each rank's output, per attempt
    <job_dir>/attempt_001/rank_0.stderr
    <job_dir>/attempt_001/rank_0.error.json  torch's @record error file (TORCHELASTIC_ERROR_FILE)
    <job_dir>/run_002/attempt_001/...      a later invocation of the same job (``start_run``)
    <job_dir>/result.json                  the final snapshot, written at the end

Each ``rankwarden run`` of a job writes rank output to files of its own: the
first into the job directory itself, every later one (``--run-id`` of an
earlier job, to resume it) into ``run_NNN/``, so nothing of an earlier run
is echoed again or appended to.

Events are appended synchronously with a flush per line: they are few (not
heartbeats), ordering matters more than latency, and a line must be on disk
before the coordinator acts on the event it describes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, NamedTuple

import msgspec

__all__ = ["JobDir", "OutputLine", "RankFiles", "RankOutputTail", "TorchrunLogs", "read_as_shown"]


class RankFiles(NamedTuple):
    stdout: Path
    stderr: Path
    #: Where torch's ``@record`` writes the rank's exception (TORCHELASTIC_ERROR_FILE).
    error_file: Path


class TorchrunLogs(NamedTuple):
    """torchrun's ``--log-dir`` layout, kept next to the job directory's own files:
    ``<log_dir>/<run_id>_<random>/attempt_<restart>/<local_rank>/{stdout,stderr}.log``
    for the streams ``streams(rank)`` names, and ``error.json`` for every rank."""

    run_dir: Path
    streams: object  # Callable[[int], tuple[str, ...]]: "stdout"/"stderr" to keep there

    @classmethod
    def create(cls, log_dir: str | os.PathLike[str], run_id: str, streams) -> "TorchrunLogs":
        base = Path(log_dir).absolute()
        base.mkdir(parents=True, exist_ok=True)
        return cls(Path(tempfile.mkdtemp(prefix=f"{run_id}_", dir=base)), streams)

    def rank_dir(self, rank: int, attempt: int) -> Path:
        return self.run_dir / f"attempt_{attempt - 1}" / str(rank)


class JobDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).absolute()
        #: Where this run's attempt_NNN/ directories go (see ``start_run``).
        self.logs = self.path
        self.torchrun: TorchrunLogs | None = None
        self._events: IO[bytes] | None = None

    def start_run(self) -> Path:
        """Give this invocation rank-output files of its own and return where they go.

        The first run of a job uses the job directory itself; a later one
        (the same job id run again, to resume it) gets ``run_NNN/``."""
        if not (self.path / "attempt_001").exists():
            return self.logs
        number = 2
        while True:
            candidate = self.path / f"run_{number:03d}"
            try:
                candidate.mkdir(parents=True)
            except FileExistsError:
                number += 1
                continue
            self.logs = candidate
            return candidate

    def prepare(self, spec_json: bytes) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "spec.json").write_bytes(spec_json)
        self._events = open(self.path / "events.jsonl", "ab")

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    def attempt_dir(self, attempt: int) -> Path:
        return self.logs / f"attempt_{attempt:03d}"

    def log_paths(self, rank: int, attempt: int) -> tuple[Path, Path]:
        base = self.attempt_dir(attempt)
        return base / f"rank_{rank}.stdout", base / f"rank_{rank}.stderr"

    def error_file(self, rank: int, attempt: int) -> Path:
        if self.torchrun is not None:
            return self.torchrun.rank_dir(rank, attempt) / "error.json"
        return self.attempt_dir(attempt) / f"rank_{rank}.error.json"

    def rank_files(self, rank: int, attempt: int) -> RankFiles:
        """The files of a rank about to start, created now (with torchrun's
        ``--log-dir`` layout linked to them, when asked for)."""
        stdout, stderr = self.log_paths(rank, attempt)
        stdout.parent.mkdir(parents=True, exist_ok=True)
        error_file = self.error_file(rank, attempt)
        if self.torchrun is not None:
            rank_dir = self.torchrun.rank_dir(rank, attempt)
            rank_dir.mkdir(parents=True, exist_ok=True)
            for stream in self.torchrun.streams(rank):  # type: ignore[operator]
                ours = stdout if stream == "stdout" else stderr
                ours.touch()
                # One file under two names: the rank writes it once (the
                # launcher appends to the existing inode). A symlink where
                # the two directories are on different filesystems.
                try:
                    os.link(ours, rank_dir / f"{stream}.log")
                except OSError:
                    os.symlink(ours, rank_dir / f"{stream}.log")
        return RankFiles(stdout, stderr, error_file)

    def stderr_tail(self, rank: int, attempt: int, lines: int = 10) -> list[str]:
        """The last ``lines`` lines of a rank's stderr in one attempt (empty if none)."""
        try:
            with open(self.log_paths(rank, attempt)[1], "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                data = f.read()
        except FileNotFoundError:
            return []
        shown = (read_as_shown(line).decode(errors="replace") for line in data.split(b"\n"))
        return [line for line in shown if line.strip()][-lines:]

    def error_summary(self, rank: int, attempt: int) -> str:
        """The exception torch's ``@record`` wrote for a rank ("ValueError: ..."), or ""."""
        try:
            error = msgspec.json.decode(self.error_file(rank, attempt).read_bytes())
            message = error["message"]
            return str(message["message"] if isinstance(message, dict) else message)
        except (OSError, msgspec.DecodeError, KeyError, TypeError):
            return ""

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
    the CLI echoes it by tailing them. Only complete lines are returned, unless
    ``final`` (the job has ended), each as a person reads it (``read_as_shown``):
    a progress bar redrawn with ``\\r`` (tqdm) is one line in its last state,
    not one line per redraw. The unfinished line of each file, in its current
    state, is in ``partials`` (a terminal shows it updating in place)."""

    _CHUNK = 1 << 20
    #: An unfinished line longer than this (no newline, no \\r) is returned in pieces.
    MAX_LINE = 1 << 16

    def __init__(self, job_dir: JobDir) -> None:
        self.job_dir = job_dir
        self.offsets: dict[str, int] = {}
        #: Per file: what was read of its unfinished line (only its last \\r-segment).
        self._carry: dict[str, bytes] = {}
        #: The unfinished line of each file read by the last ``read``, as shown now.
        self.partials: list[OutputLine] = []

    def read(self, ranks: list[tuple[int, int]], *, final: bool = False) -> list[OutputLine]:
        """``ranks``: (rank, newest attempt) pairs; every attempt up to it is read."""
        out: list[OutputLine] = []
        self.partials = []
        for rank, newest in ranks:
            for attempt in range(1, max(newest, 1) + 1):
                # The two streams are two files, so the order of lines across
                # them is lost; when both have new lines, the one whose last
                # write came first goes first (exact when each wrote once since
                # the last read, a print and a traceback line). Timestamps are
                # coarse (a jiffy), so on a tie a batch that ends a line begun
                # before this read (a progress bar's final redraw) goes first.
                batches = [self._read_file(path, rank, attempt, final) for path in self.job_dir.log_paths(rank, attempt)]
                for _, lines in sorted(batches, key=lambda batch: batch[0]):
                    out += lines
        return out

    def _read_file(
        self, path: Path, rank: int, attempt: int, final: bool
    ) -> tuple[tuple[int, bool], list[OutputLine]]:
        key = str(path)
        start = self.offsets.get(key, 0)
        try:
            with open(path, "rb") as f:
                written = os.fstat(f.fileno()).st_mtime_ns
                f.seek(start)
                data = f.read(self._CHUNK)
        except FileNotFoundError:
            return (0, True), []
        stream = path.suffix[1:]
        self.offsets[key] = start + len(data)
        carried = self._carry.pop(key, b"")
        data = carried + data
        end = data.rfind(b"\n") + 1
        lines = [OutputLine(rank, attempt, stream, read_as_shown(line)) for line in data[:end].split(b"\n")[:-1]]
        rest = _last_redraw(data[end:])
        if rest and (final or len(rest) > self.MAX_LINE):
            lines.append(OutputLine(rank, attempt, stream, read_as_shown(rest)))
            rest = b""
        if rest:
            self._carry[key] = rest
            shown = read_as_shown(rest)
            if shown.strip():
                self.partials.append(OutputLine(rank, attempt, stream, shown))
        return (written, not (carried and end)), lines


def _last_redraw(text: bytes) -> bytes:
    """An unfinished line from its last redraw on: what follows its last \\r (one
    that ends it is kept: it may be the first half of \\r\\n)."""
    cut = text.rfind(b"\r", 0, len(text) - 1)
    return text[cut + 1:] if cut >= 0 else text


def read_as_shown(line: bytes) -> bytes:
    """A line (without its newline) as a terminal leaves it: the text after its last
    carriage return, so a progress bar's redraws are its final state; a \\r\\n
    ending is a plain end of line."""
    if line.endswith(b"\r"):
        line = line[:-1]
    return line[line.rfind(b"\r") + 1:]
