"""Local processes: each rank in its own session and process group.

Stopping a rank is the one place where processes could leak, so it follows
trio's own ``Process`` discipline, plus one thing trio does not do: the whole
process group is killed, not just the leader, so a rank's DataLoader workers or
shell children die with it. To make that safe from PID reuse we wait for the
leader to exit *without reaping it* (a pidfd becomes readable), kill the group
while the zombie leader still pins the group id, and only then reap.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

import trio

from rankwarden.launcher._base import CpuSample, ExitStatus, LaunchRequest

__all__ = ["LocalProcess"]

log = logging.getLogger(__name__)

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def sample_pid(pid: int) -> CpuSample | None:
    """``/proc/<pid>/stat``'s state and CPU seconds; None if gone or a zombie.

    Also the node relay's view of a local rank it did not start (by the pid in its hello)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # The command name (field 2) may hold spaces and ')': split after the last one.
        fields = stat[stat.rindex(b")") + 2:].split()
        state = fields[0].decode()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    except (OSError, ValueError, IndexError):
        return None
    if state in ("Z", "X"):
        return None
    return CpuSample(state, ticks / _TICKS)


class LocalProcess:
    """A rank that is a direct child of this process (``subprocess.Popen``)."""

    #: Started from a pre-imported zygote (``WarmProcess``) rather than a new interpreter.
    warm = False

    def __init__(self, process: subprocess.Popen | None, request: LaunchRequest, *, pid: int | None = None) -> None:
        self._process = process
        self._pid = process.pid if process is not None else pid
        assert self._pid is not None
        self._request = request
        self._status: ExitStatus | None = None
        self._lock = trio.Lock()
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(self._pid)
        except (AttributeError, OSError):  # not Linux >= 5.3: reap first, then signal
            self._pidfd = None

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def status(self) -> ExitStatus | None:
        return self._status

    def sample(self) -> CpuSample | None:
        """State and CPU time (user + system, all threads) from ``/proc/<pid>/stat``.

        One small read of procfs (microseconds), so it is done on the loop. The
        leader's state letter is the process's; a zombie or a reaped rank gives
        None: its exit is the exit watcher's to report."""
        if self._status is not None:
            return None
        return sample_pid(self._pid)

    def signal(self, sig: int) -> None:
        if self._status is not None:
            return  # reaped: the group id may already belong to someone else
        try:
            os.killpg(self._pid, sig)
        except ProcessLookupError:
            pass

    async def _reap(self) -> ExitStatus:
        """The exit status, once the leader has exited (it returns at once then)."""
        assert self._process is not None
        if self._pidfd is None:
            returncode = await trio.to_thread.run_sync(self._process.wait, abandon_on_cancel=True)
        else:
            returncode = self._process.wait()
        return ExitStatus.from_returncode(returncode)

    async def wait(self) -> ExitStatus:
        async with self._lock:
            if self._status is None:
                if self._pidfd is not None:
                    await trio.lowlevel.wait_readable(self._pidfd)
                    # Leader exited but is not reaped: its group id is still ours.
                    self.signal(signal.SIGKILL)
                self._status = await self._reap()
                if self._pidfd is not None:
                    os.close(self._pidfd)
                    self._pidfd = None
        return self._status

    async def stop(self, grace: float) -> ExitStatus:
        with trio.CancelScope(shield=True):
            if self._status is None:
                # SIGCONT too: a SIGSTOPped rank cannot act on SIGTERM until resumed.
                self.signal(signal.SIGTERM)
                self.signal(signal.SIGCONT)
                with trio.move_on_after(grace):
                    return await self.wait()
                log.info(
                    "job=%s attempt=%d rank=%d: no exit %.1fs after SIGTERM; sending SIGKILL",
                    self._request.job_id, self._request.attempt, self._request.rank, grace,
                )
                self.signal(signal.SIGKILL)
            return await self.wait()
