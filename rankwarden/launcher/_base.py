"""The launcher seam: how the coordinator starts and stops one rank.

A launcher turns a ``LaunchRequest`` into a running ``RankProcess``. The
coordinator never touches PIDs, pods or signals directly; everything it needs
is ``wait`` (how did it end) and ``stop`` (end it now, always reaped). The
local implementation is ``ProcessLauncher``; the test fake lives in
``rankwarden.testing``; the Kubernetes one implements the same two methods.
"""

from __future__ import annotations

import signal as _signal
from typing import Protocol, runtime_checkable

import msgspec

__all__ = ["ExitStatus", "LaunchRequest", "Launcher", "RankProcess"]


class ExitStatus(msgspec.Struct, frozen=True):
    """How a rank's process ended: an exit ``code`` or a ``signal`` number."""

    code: int | None = None
    signal: int | None = None

    @classmethod
    def from_returncode(cls, returncode: int) -> "ExitStatus":
        # subprocess convention: -N means "killed by signal N".
        if returncode < 0:
            return cls(signal=-returncode)
        return cls(code=returncode)

    @property
    def ok(self) -> bool:
        return self.code == 0 and self.signal is None

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = _signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name}"
        return f"exited with code {self.code}"


class LaunchRequest(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    rank: int
    local_rank: int
    attempt: int
    argv: list[str]
    env: dict[str, str]
    cwd: str | None = None
    stdout_path: str
    stderr_path: str


@runtime_checkable
class RankProcess(Protocol):
    """One running rank. ``wait`` may be called by several tasks; ``stop`` is idempotent."""

    @property
    def pid(self) -> int | None: ...

    async def wait(self) -> ExitStatus:
        """Return once the rank has ended (and is reaped)."""
        ...

    async def stop(self, grace: float) -> ExitStatus:
        """Ask the rank to end (SIGTERM), kill it after ``grace`` seconds, reap it.

        Runs shielded: a cancelled caller still gets the rank stopped."""
        ...

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the rank (its whole process group); no-op once it ended."""
        ...


@runtime_checkable
class Launcher(Protocol):
    async def start(self, request: LaunchRequest) -> RankProcess:
        """Start one rank; raise ``LaunchError`` if it cannot be started at all."""
        ...
