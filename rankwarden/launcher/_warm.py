"""Warm ranks: forked from a zygote that has already imported torch.

Why a zygote and not a pool of spare interpreters: a group restart replaces
every rank, so a pool needs ``world_size`` spares, each a whole interpreter
(about 350 MiB resident with torch), and after each restart it re-imports
torch ``world_size`` times in the background, on the CPUs the new attempt is
training on. A zygote imports once per job; forking is milliseconds and its
pages are shared copy-on-write. The price is that a warm rank is the zygote's
child, not ours, so the zygote reports its exit status, and the launcher keeps
``LocalProcess``'s discipline through the protocol: it waits on a pidfd, kills
the process group while the exited leader (unreaped by the zygote) still pins
the group id, and only then asks the zygote to reap.

The zygote is started on the loop thread when the first rank of a job is
launched (so ``PR_SET_PDEATHSIG`` holds: coordinator -> zygote -> rank) and
stopped by ``release(job_id)``. Launching never waits for it: until it is
ready, or if it refuses (a thread appeared, CUDA initialised), or if a rank's
environment differs from the zygote's in a variable read at import, ranks
start fresh.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from pathlib import Path

import trio

from rankwarden import _warm_protocol as wire
from rankwarden.errors import ProtocolError
from rankwarden.launcher._base import BOOTSTRAP_MODULE, ExitStatus, LaunchRequest
from rankwarden.launcher._local import LocalProcess

__all__ = ["PER_RANK_VARIABLES", "WarmProcess", "Zygote", "warm_target"]

log = logging.getLogger(__name__)

ZYGOTE_MODULE = "rankwarden.worker._zygote"
#: A reap is answered at once (the child has exited); a zygote that does not answer is frozen.
REAP_TIMEOUT = 10.0
#: What the coordinator sets differently for each rank and attempt. None is
#: read by torch at import, so a zygote that imported under any values of
#: them serves every rank; every other variable must equal the zygote's.
PER_RANK_VARIABLES = frozenset({
    "RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
    "RANKWARDEN_ATTEMPT", "RANKWARDEN_CHECKPOINT_TAG",
    # torchrun's @record error file: one path per attempt and rank.
    "TORCHELASTIC_ERROR_FILE",
})


def warm_target(argv: list[str]) -> tuple[str, str, str, list[str]] | None:
    """(python, mode, target, args) when ``argv`` runs a Python entrypoint through the bootstrap."""
    if len(argv) >= 5 and argv[1:3] == ["-m", BOOTSTRAP_MODULE] and argv[3] in ("script", "module"):
        return argv[0], argv[3], argv[4], argv[5:]
    return None


def import_environment(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in PER_RANK_VARIABLES}


class WarmProcess(LocalProcess):
    """A rank forked by a zygote: same contract as LocalProcess; the zygote reaps on request."""

    warm = True

    def __init__(self, zygote: "Zygote", pid: int, request: LaunchRequest) -> None:
        super().__init__(None, request, pid=pid)
        self._zygote = zygote

    async def _reap(self) -> ExitStatus:
        returncode = await self._zygote.reap(self._pid)
        if returncode is None:
            # The zygote died, and PR_SET_PDEATHSIG killed its ranks with it.
            return ExitStatus(signal=9, reason="ZygoteLost",
                              message="its zygote exited, so the kernel killed it (PR_SET_PDEATHSIG)")
        return ExitStatus.from_returncode(returncode)


class Zygote:
    """One job's pre-imported interpreter, and the socket to it. Requests are serial."""

    def __init__(self, job_id: str, python: str, env: dict[str, str], process: LocalProcess, sock: socket.socket) -> None:
        self.job_id = job_id
        self.python = python
        self.environment = import_environment(env)
        self.process = process
        self._sock = sock
        self._decoder = wire.FrameDecoder(wire.FromZygote)
        self._pending: list = []
        self._lock = trio.Lock()
        self.ready: wire.Ready | None = None
        #: Why this zygote serves no ranks ('' while it may).
        self.broken = ""

    @classmethod
    def start(cls, request: LaunchRequest, python: str, log_path: Path) -> "Zygote":
        """Start the zygote (on the calling thread: the loop's); it imports in the background."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = import_environment(request.env)
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "ab") as out:
                popen = subprocess.Popen(
                    [python, "-m", ZYGOTE_MODULE, str(theirs.fileno())],
                    env=env, cwd=request.cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                    start_new_session=True, pass_fds=(theirs.fileno(),),
                )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        log.info("job=%s: started zygote pid %d for warm restarts (log %s)", request.job_id, popen.pid, log_path)
        return cls(request.job_id, python, request.env, LocalProcess(popen, request), ours)

    def serves(self, request: LaunchRequest, python: str) -> str:
        """Why ``request`` cannot be forked from this zygote ('' when it can)."""
        if self.broken:
            return self.broken
        if python != self.python:
            return f"the rank's interpreter {python!r} is not the zygote's {self.python!r}"
        env = import_environment(request.env)
        if env != self.environment:
            changed = sorted(k for k in env.keys() | self.environment.keys() if env.get(k) != self.environment.get(k))
            return f"the rank's environment differs from the zygote's in {', '.join(changed[:5])}"
        return ""

    async def wait_ready(self) -> bool:
        """Wait until the zygote has imported (True) or cannot serve (False)."""
        async with self._lock:
            while self.ready is None and not self.broken:
                await trio.lowlevel.wait_readable(self._sock)
                self._receive_available()
            return self.ready is not None and not self.broken

    async def spawn(self, request: LaunchRequest, mode: str, target: str, args: list[str]) -> WarmProcess | None:
        """Fork the rank, or None (not ready yet, refused, broken): start it fresh then."""
        async with self._lock:
            if self.ready is None and not self.broken:
                self._receive_available()  # never waits for the imports
            if self.ready is None or self.broken:
                return None
            spawn = wire.Spawn(mode=mode, target=target, args=list(args), env=dict(request.env),
                               cwd=request.cwd or os.getcwd(), stdout_path=request.stdout_path,
                               stderr_path=request.stderr_path)
            answer = await self._ask(spawn)
            if isinstance(answer, wire.Spawned):
                return WarmProcess(self, answer.pid, request)
            if isinstance(answer, wire.Refused):
                self.broken = f"the zygote refused to fork: {answer.reason}"
                log.warning("job=%s: %s; ranks start fresh from now on", self.job_id, self.broken)
            return None

    async def reap(self, pid: int) -> int | None:
        """The exited child's returncode; None if the zygote is gone or does not answer."""
        answer = None
        with trio.CancelScope(shield=True):  # an exited child must be reaped, cancelled or not
            with trio.move_on_after(REAP_TIMEOUT) as waited:
                async with self._lock:
                    answer = await self._ask(wire.Reap(pid=pid))
            if waited.cancelled_caught:
                self.broken = f"the zygote did not answer within {REAP_TIMEOUT:g}s (frozen?)"
                log.warning("job=%s: %s; ranks start fresh from now on", self.job_id, self.broken)
        return answer.returncode if isinstance(answer, wire.Reaped) else None

    async def aclose(self, grace: float = 2.0) -> None:
        """Hang up (the zygote exits when it reads EOF) and stop and reap it."""
        with trio.CancelScope(shield=True):
            self.broken = self.broken or "the zygote was released"
            self._sock.close()
            with trio.move_on_after(grace):
                await self.process.wait()
            await self.process.stop(0.0)

    # -- the socket ------------------------------------------------------------------

    def _handle(self, message) -> bool:
        """Take a message the zygote sends unasked; True if it was one."""
        if isinstance(message, wire.Ready):
            self.ready = message
            log.info("job=%s: zygote ready after %.2fs of imports; restarts will be warm", self.job_id, message.import_seconds)
            return True
        if isinstance(message, wire.Unavailable):
            self.broken = f"the zygote cannot fork ranks: {message.reason}"
            log.warning("job=%s: %s; ranks start fresh", self.job_id, self.broken)
            return True
        return False

    def _feed(self, data: bytes) -> None:
        if not data:
            self.broken = self.broken or "the zygote exited"
            return
        try:
            messages = self._decoder.feed(data)
        except ProtocolError as exc:
            self.broken = f"the zygote sent garbage: {exc}"
            return
        self._pending += [m for m in messages if not self._handle(m)]

    def _receive_available(self) -> None:
        while not self.broken:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:
                data = b""
                log.warning("job=%s: zygote socket: %s", self.job_id, exc)
            self._feed(data)

    async def _ask(self, message):
        """Send one request and return its answer; None when the zygote is gone."""
        try:
            frame = wire.encode(message)
            while frame:
                await trio.lowlevel.wait_writable(self._sock)
                sent = self._sock.send(frame)
                frame = frame[sent:]
            while not self._pending and not self.broken:
                await trio.lowlevel.wait_readable(self._sock)
                self._receive_available()
        except OSError as exc:
            self.broken = self.broken or f"the zygote's socket failed: {exc}"
        return self._pending.pop(0) if self._pending else None
