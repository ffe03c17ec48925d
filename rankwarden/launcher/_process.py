"""Local processes: each rank in its own session and process group.

Stopping a rank is the one place where processes could leak, so it follows
trio's own ``Process`` discipline, plus one thing trio does not do: the whole
process group is killed, not just the leader, so a rank's DataLoader workers or
shell children die with it. To make that safe from PID reuse we wait for the
leader to exit *without reaping it* (a pidfd becomes readable), kill the group
while the zombie leader still pins the group id, and only then reap.

Ranks are forked from the thread that runs the coordinator's Trio loop, not
through ``trio.lowlevel.open_process``, which forks in a worker thread of
trio's cache: ``PR_SET_PDEATHSIG`` fires when the parent *thread* exits, and
trio retires idle worker threads after 10 s, which SIGKILLed every rank that
lived longer than that. Fork+exec costs the loop about a millisecond.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import trio

from rankwarden.errors import LaunchError
from rankwarden.launcher._base import ExitStatus, LaunchRequest

__all__ = ["ProcessLauncher", "LocalProcess"]

log = logging.getLogger(__name__)


class LocalProcess:
    def __init__(self, process: subprocess.Popen, request: LaunchRequest) -> None:
        self._process = process
        self._request = request
        self._status: ExitStatus | None = None
        self._lock = trio.Lock()
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(process.pid)
        except (AttributeError, OSError):  # not Linux >= 5.3: reap first, then signal
            self._pidfd = None

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def status(self) -> ExitStatus | None:
        return self._status

    def signal(self, sig: int) -> None:
        if self._status is not None:
            return  # reaped: the group id may already belong to someone else
        try:
            os.killpg(self._process.pid, sig)
        except ProcessLookupError:
            pass

    async def wait(self) -> ExitStatus:
        async with self._lock:
            if self._status is None:
                if self._pidfd is not None:
                    await trio.lowlevel.wait_readable(self._pidfd)
                    # Leader exited but is not reaped: its group id is still ours.
                    self.signal(signal.SIGKILL)
                    returncode = self._process.wait()  # it has exited: returns at once
                else:
                    returncode = await trio.to_thread.run_sync(self._process.wait, abandon_on_cancel=True)
                self._status = ExitStatus.from_returncode(returncode)
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


class ProcessLauncher:
    """Starts each rank as a local process with its output captured to files."""

    async def start(self, request: LaunchRequest) -> LocalProcess:
        stdout_path, stderr_path = Path(request.stdout_path), Path(request.stderr_path)
        try:
            stdout_path.parent.mkdir(parents=True, exist_ok=True)
            stderr_path.parent.mkdir(parents=True, exist_ok=True)
            with open(stdout_path, "ab") as out, open(stderr_path, "ab") as err:
                process = subprocess.Popen(
                    request.argv,
                    env=request.env,
                    cwd=request.cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    # Own session and process group: a terminal's Ctrl-C reaches only
                    # the coordinator, and killpg reaches everything the rank started.
                    start_new_session=True,
                )
        except OSError as exc:
            raise LaunchError(
                f"cannot start rank {request.rank} of job {request.job_id}: "
                f"{request.argv[0]!r}: {exc.strerror or exc}"
            ) from exc
        await trio.lowlevel.checkpoint()
        return LocalProcess(process, request)
