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

from rankwarden.spec import Resources

__all__ = ["ExitStatus", "LaunchRequest", "Launcher", "Placement", "RankProcess"]


class ExitStatus(msgspec.Struct, frozen=True):
    """How a rank's process ended: an exit ``code`` or a ``signal`` number.

    A launcher that knows more says so in ``reason`` and ``message`` (a pod's
    ``OOMKilled``, ``Evicted``, ``Unschedulable``). ``started`` is False when
    the rank never ran at all (its image could not be pulled, no node fits it).
    """

    code: int | None = None
    signal: int | None = None
    reason: str | None = None
    message: str = ""
    started: bool = True

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
            text = f"killed by {name}"
        elif self.code is not None:
            text = f"exited with code {self.code}"
        elif not self.started:
            text = "could not start"
        else:
            text = "ended"
        if self.reason:
            detail = f"{self.reason}: {self.message}" if self.message else self.reason
            text = f"{text} ({detail})"
        return text


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
    #: For launchers that run ranks in containers; the process launcher ignores them.
    image: str = ""
    resources: Resources = Resources()


class Placement(msgspec.Struct, frozen=True, kw_only=True):
    """Where a launcher that runs ranks off this host puts them (one rank per pod).

    A launcher with a ``placement(job_id)`` method gets ranks whose environment
    is built from the spec alone (not the coordinator's own environment), as
    one-process nodes of a multi-node torchrun job, with ``MASTER_ADDR`` set to
    rank 0's stable name."""

    master_addr: str
    master_port: int = 29500
    #: Interpreter inside the rank's image, when the spec names none.
    python: str = "python"
    #: Seconds a rank keeps trying to reach a restarted coordinator before it
    #: gives up (pods outlive the coordinator; local processes do not).
    reconnect_grace: float = 0.0


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
