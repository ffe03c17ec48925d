"""The launcher seam: how the coordinator starts and stops one rank.

A launcher turns a ``LaunchRequest`` into a running ``RankProcess``. The
coordinator never touches PIDs, pods or signals directly; everything it needs
is ``wait`` (how did it end) and ``stop`` (end it now, always reaped). The
local implementation is ``ProcessLauncher``; the test fake lives in
``rankwarden.testing``; the Kubernetes one implements the same two methods.

Optional capabilities are declared here as Protocols, and callers test for
them with ``isinstance`` (never ``getattr``):

    PlacesRanks      placement(job_id)        ranks run off this host (pods)
    AdoptsRanks      adopt(job_id)            find ranks a previous coordinator left running
    ReleasesJobs     release(job_id)          after a job: free what it held (a Service, a zygote)
    Detaches         detach()                 a stopping server leaves ranks running
    ReleasesOrphans  release_orphans(active)  free what jobs that no longer run still hold
    SizesAttempts    size_attempt(job, n)     how many ranks group attempt n has (elastic
                                              node counts); waits for enough nodes
    WarmAware        warm                     on a RankProcess: forked pre-imported, not fresh
    ReportsCpu       sample()                 on a RankProcess: its scheduler state and CPU
                                              time, to tell a busy rank from a frozen one
"""

from __future__ import annotations

import signal as _signal
from typing import Protocol, runtime_checkable

import msgspec

from rankwarden.spec import Resources

__all__ = [
    "BOOTSTRAP_MODULE",
    "AdoptsRanks",
    "CpuSample",
    "Detaches",
    "ExitStatus",
    "LaunchRequest",
    "Launcher",
    "Placement",
    "PlacesRanks",
    "RankProcess",
    "ReleasesJobs",
    "ReleasesOrphans",
    "ReportsCpu",
    "WarmAware",
]

#: Every Python rank starts as ``python -m BOOTSTRAP_MODULE {script|module|exec} TARGET ARGS``.
BOOTSTRAP_MODULE = "rankwarden.worker._bootstrap"


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
    #: May be forked from a pre-imported interpreter (a launcher that has none ignores it).
    warm: bool = False


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


@runtime_checkable
class PlacesRanks(Protocol):
    def placement(self, job_id: str) -> Placement:
        """Where this launcher's ranks of ``job_id`` run and how they reach each other."""
        ...


@runtime_checkable
class AdoptsRanks(Protocol):
    async def adopt(self, job_id: str) -> dict[int, tuple[int, RankProcess]]:
        """Ranks of ``job_id`` still running: rank -> (attempt, process)."""
        ...


@runtime_checkable
class ReleasesJobs(Protocol):
    async def release(self, job_id: str) -> None:
        """The job is over and its ranks are gone: free what the launcher holds for it."""
        ...


@runtime_checkable
class Detaches(Protocol):
    def detach(self) -> None:
        """From now on leave ranks running when jobs are torn down (a server handing over)."""
        ...


@runtime_checkable
class ReleasesOrphans(Protocol):
    async def release_orphans(self, active: set[str]) -> list[str]:
        """Free what jobs not in ``active`` still hold; return their ids."""
        ...


@runtime_checkable
class SizesAttempts(Protocol):
    async def size_attempt(self, job_id: str, attempt: int) -> int:
        """The world size of group attempt ``attempt``, decided before its ranks start
        (fewer ranks than ``JobSpec.world_size`` where nodes were lost). Raises
        ``LaunchError`` when no attempt can start (too few nodes for too long)."""
        ...


@runtime_checkable
class WarmAware(Protocol):
    """A RankProcess that says whether it was forked from a pre-imported interpreter."""

    warm: bool


class CpuSample(msgspec.Struct, frozen=True):
    """A rank process's scheduler ``state`` (``/proc/<pid>/stat``'s letter: R
    running, S sleeping, D in uninterruptible I/O, T/t stopped, Z zombie) and
    the CPU seconds all its threads have used so far."""

    state: str
    cpu_seconds: float

    @property
    def stopped(self) -> bool:
        """SIGSTOPped (T) or stopped by a tracer (t): it runs no code at all."""
        return self.state in ("T", "t")


@runtime_checkable
class ReportsCpu(Protocol):
    """A RankProcess whose state and CPU time the coordinator can read (a local
    process, warm or fresh; not a pod). Consulted when a rank's heartbeats stop:
    a rank that keeps using CPU is busy in a call that holds the GIL, not frozen."""

    def sample(self) -> CpuSample | None:
        """Now, or None once the process is gone. Cheap and non-blocking."""
        ...
