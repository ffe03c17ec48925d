"""ProcessLauncher: ranks as local processes, fresh or forked warm from a zygote.

Ranks are started from the thread that runs the coordinator's Trio loop, not
through ``trio.lowlevel.open_process``, which forks in a worker thread of
trio's cache: ``PR_SET_PDEATHSIG`` fires when the parent *thread* exits, and
trio retires idle worker threads after 10 s, which SIGKILLed every rank that
lived longer than that. Fork+exec costs the loop about a millisecond. A
job's zygote is started the same way, so the chain coordinator -> zygote ->
warm rank holds too. How a rank is stopped and reaped: ``LocalProcess``.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import trio

from rankwarden.errors import LaunchError
from rankwarden.launcher._base import LaunchRequest
from rankwarden.launcher._local import LocalProcess
from rankwarden.launcher._warm import WarmProcess, Zygote, warm_target

__all__ = ["ProcessLauncher", "LocalProcess"]

log = logging.getLogger(__name__)


class ProcessLauncher:
    """Starts each rank as a local process with its output captured to files.

    A request marked ``warm`` for a Python entrypoint is forked from the job's
    zygote once it is ready (``rankwarden.launcher._warm``); anything else, or
    whenever the zygote cannot serve it, starts a fresh interpreter."""

    def __init__(self) -> None:
        self._zygotes: dict[str, Zygote] = {}
        self._fresh_reason: dict[str, str] = {}

    async def start(self, request: LaunchRequest) -> LocalProcess:
        stdout_path, stderr_path = Path(request.stdout_path), Path(request.stderr_path)
        try:
            stdout_path.parent.mkdir(parents=True, exist_ok=True)
            stderr_path.parent.mkdir(parents=True, exist_ok=True)
            with open(stdout_path, "ab") as out, open(stderr_path, "ab") as err:
                warm = await self._start_warm(request)
                if warm is not None:
                    return warm
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

    async def _start_warm(self, request: LaunchRequest) -> WarmProcess | None:
        target = warm_target(request.argv) if request.warm and sys.platform.startswith("linux") else None
        if target is None:
            return None
        python, mode, entrypoint, args = target
        zygote = self._zygotes.get(request.job_id)
        if zygote is None:
            log_path = Path(request.stderr_path).parent.parent / "zygote.log"
            zygote = self._zygotes[request.job_id] = Zygote.start(request, python, log_path)
        why = zygote.serves(request, python)
        process = None if why else await zygote.spawn(request, mode, entrypoint, args)
        if process is None:
            why = why or zygote.broken or "the zygote is still importing"
            if self._fresh_reason.get(request.job_id) != why:
                self._fresh_reason[request.job_id] = why
                log.info("job=%s attempt=%d rank=%d: starting fresh: %s",
                         request.job_id, request.attempt, request.rank, why)
        return process

    async def warm_ready(self, job_id: str) -> bool:
        """Wait until ``job_id``'s zygote is ready (True), or will never be (False: no
        zygote, it failed, or it refused). Launching never waits for it; tests and
        benchmarks do."""
        zygote = self._zygotes.get(job_id)
        return zygote is not None and await zygote.wait_ready()

    async def release(self, job_id: str) -> None:
        """Stop the job's zygote (after its ranks): nothing of the job is left running."""
        self._fresh_reason.pop(job_id, None)
        zygote = self._zygotes.pop(job_id, None)
        if zygote is not None:
            await zygote.aclose()
