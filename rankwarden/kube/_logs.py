"""A pod's output copied into its rank's log file, continued by the next coordinator without doubles.

The kubelet keeps a container's log in files it rotates, and serves only the
current one: after a rotation, a read "from the start" begins somewhere in
the middle, so skipping the bytes already copied (what this launcher did)
drops lines. Instead the log is read with ``timestamps=true``: every line
comes with the time the runtime took it, and the rank's log file has a
*mark* beside it (``<file>.k8s-log-mark``): the time of the last line copied
and how many lines copied so far carry that very time (times may repeat).
A coordinator that adopts the pod asks for ``sinceTime`` (the mark, cut to
whole seconds, since API servers may not keep more) and drops every line
older than the mark and the first ``count`` lines at the mark's time.

The mark is replaced (write, rename) after each chunk has been written and
flushed: a coordinator killed between the two can copy that chunk's lines a
second time, never lose one.

Lines longer than the runtime's entry size arrive as several entries, each
with its own time; they are copied as they come (a time in the middle of
such a line is not recognised).
"""

from __future__ import annotations

import calendar
import os
import time
from pathlib import Path
from typing import NamedTuple

__all__ = ["LogMark", "TimestampedLines", "load_mark", "mark_path", "parse_time", "save_mark", "since_time"]


class LogMark(NamedTuple):
    time: int  # nanoseconds since the epoch, of the last line copied
    count: int  # lines copied so far with exactly that time


def mark_path(log: Path) -> Path:
    return log.with_name(log.name + ".k8s-log-mark")


def load_mark(path: Path) -> LogMark | None:
    try:
        stamp, count = path.read_text().split()
        return LogMark(int(stamp), int(count))
    except (FileNotFoundError, ValueError):
        return None


def save_mark(path: Path, mark: LogMark) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{mark.time} {mark.count}\n")
    os.replace(tmp, path)


def parse_time(text: str) -> int:
    """An RFC 3339 time as Kubernetes writes it (``2026-01-02T03:04:05.123456789Z``,
    any number of fraction digits, or an offset) in nanoseconds since the epoch."""
    head, offset = text[:19], 0
    rest = text[19:]
    fraction = ""
    if rest.startswith("."):
        digits = len(rest) - len(rest[1:].lstrip("0123456789"))
        fraction, rest = rest[1:digits], rest[digits:]
    if rest not in ("Z", "z"):
        sign = -1 if rest[0] == "-" else 1
        hours, minutes = rest[1:].split(":")
        offset = sign * (int(hours) * 3600 + int(minutes) * 60)
    seconds = calendar.timegm(time.strptime(head, "%Y-%m-%dT%H:%M:%S")) - offset
    return seconds * 10**9 + int((fraction or "0").ljust(9, "0")[:9])


def since_time(mark: LogMark) -> str:
    """The ``sinceTime`` to ask for: the mark's whole second (inclusive), so nothing after it is missed."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mark.time // 10**9))


class TimestampedLines:
    """Sans-IO: chunks of a ``timestamps=true`` log in, the lines to copy (times cut) out.

    Lines at or before ``mark`` (see the module docstring) are dropped;
    ``self.mark`` is the mark to save once the returned bytes are written."""

    def __init__(self, mark: LogMark | None = None) -> None:
        self.mark = mark
        self._skip = mark  # what the previous coordinator copied
        self._seen_at_mark = 0
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        return b"".join(self._line(line, b"\n") for line in lines)

    def end(self) -> bytes:
        """The unterminated last line, if the stream ended with one."""
        line, self._pending = self._pending, b""
        return self._line(line, b"") if line else b""

    def _line(self, line: bytes, newline: bytes) -> bytes:
        stamp_text, _, text = line.partition(b" ")
        try:
            stamp = parse_time(stamp_text.decode("ascii"))
        except (ValueError, IndexError, UnicodeDecodeError):
            return line + newline  # not a timestamped line (see the module docstring): copy it
        if self._skip is not None:
            if stamp < self._skip.time:
                return b""
            if stamp == self._skip.time and self._seen_at_mark < self._skip.count:
                self._seen_at_mark += 1
                return b""
            self._skip = None
        if self.mark is not None and stamp == self.mark.time:
            self.mark = LogMark(stamp, self.mark.count + 1)
        else:
            self.mark = LogMark(stamp, 1)
        return text + newline
