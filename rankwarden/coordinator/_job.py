"""The coordinator: one job's lifetime, from first launch to succeeded, failed or stopped.

Usage from a custom launcher (the CLI and the API server do exactly this)::

    coordinator = Coordinator(spec)
    async with trio.open_nursery() as nursery:
        await nursery.start(coordinator.run)
        async for event in coordinator.events():
            ...

``run`` owns every task and process of the job; when it returns, nothing of
the job is left running. Everything it hands out (events, snapshots) is frozen.

The restart policy (what a failure costs: the group, one rank, or, in live
mode, only the failed rank's replacement) is in ``_policy``.
"""

from __future__ import annotations

import functools
import hmac
import logging
import random
import secrets
import time
from pathlib import Path
from typing import Any

import msgspec
import trio

from rankwarden import protocol
from rankwarden.coordinator._checkpoints import Committer
from rankwarden.coordinator._eventlog import EventLog
from rankwarden.coordinator._failfast import EarlyFailure
from rankwarden.coordinator._heartbeat import Peer, serve_heartbeats
from rankwarden.coordinator._jobdir import JobDir
from rankwarden.coordinator._live import LiveSession
from rankwarden.coordinator._policy import RestartPolicy
from rankwarden.coordinator._rank import RankRunner
from rankwarden.coordinator._request import default_job_id, rank_argv, rank_env
from rankwarden.errors import AuthError, CheckpointError, ProtocolError
from rankwarden.events import (
    Event,
    Failure,
    JobFailedEvent,
    JobSnapshot,
    JobStarted,
    JobState,
    JobStopped,
    JobSucceeded,
    PeerRejected,
    RankSnapshot,
    RankState,
    Stopping,
    event_to_json,
    failure_report,
)
from rankwarden.launcher import (
    AdoptsRanks,
    LaunchRequest,
    Launcher,
    Placement,
    PlacesRanks,
    ProcessLauncher,
    RankProcess,
    ReleasesJobs,
)
from rankwarden.spec import JobSpec, RestartScope

__all__ = ["Coordinator", "run_job"]

log = logging.getLogger(__name__)

#: How long a finished job waits for commits of steps its ranks already reported.
COMMIT_DRAIN_TIMEOUT = 600.0


class Coordinator:
    """Runs one job. Create it, then ``await nursery.start(coordinator.run)``."""

    def __init__(
        self,
        spec: JobSpec,
        *,
        launcher: Launcher | None = None,
        listeners: list[trio.abc.Listener] | None = None,
        heartbeat_host: str = "127.0.0.1",
        advertise_host: str | None = None,
        heartbeat_port: int = 0,
        token: str | None = None,
        adopt: bool = False,
        rng: random.Random | None = None,
        attempts_before: int = 0,
        restarts_before: int = 0,
        master_port: int | None = None,
        tune_gc: bool = False,
    ) -> None:
        # Struct __init__ does not validate; a spec built in code is checked here,
        # so a bad one fails now with a SpecError naming the field.
        spec = JobSpec.from_dict(msgspec.to_builtins(spec))
        self.spec = spec
        self.job_id = spec.job_id or default_job_id(spec)
        self.job_dir = JobDir(spec.job_dir or Path("rankwarden-jobs") / self.job_id)
        self.launcher: Launcher = launcher or ProcessLauncher()
        self.address = ""
        self._listeners = listeners
        self._heartbeat_host = heartbeat_host
        self._advertise_host = advertise_host or heartbeat_host
        self._heartbeat_port = heartbeat_port
        #: Tune this process's garbage collector for many connections (see
        #: _heartbeat._GcTuner): for a process that is the coordinator's own.
        self._tune_gc = tune_gc
        self._rng = rng or random.Random()
        # A coordinator that takes over a job from a predecessor (``adopt``)
        # reuses its token and port, so the ranks it adopts can reconnect.
        self._token = token or secrets.token_urlsafe(32)
        self._adopt = adopt
        self._adopted: dict[int, tuple[int, RankProcess]] = {}
        self._placement: Placement | None = (
            self.launcher.placement(self.job_id) if isinstance(self.launcher, PlacesRanks) else None
        )
        self._state = JobState.PENDING
        # A job taken over from an earlier server goes on counting: its next
        # attempt is attempts_before + 1 and its restart budget is what is left.
        self._attempts_before = attempts_before
        self._attempt = attempts_before
        self._restarts_used = restarts_before
        self._master_port: int | None = None
        # The current group attempt's ranks: the spec's, or fewer where the
        # launcher sizes attempts (elastic node counts, ``SizesAttempts``).
        self._world_size = spec.world_size
        self._first_master_port = master_port  # torchrun's --master-port: the first attempt's
        self._runners: dict[int, RankRunner] = {}
        self._failures: list[Failure] = []
        self._events = EventLog()
        self._started_at: float | None = None
        self._ended_at: float | None = None
        self._stop_reason = ""
        #: Why the job failed without a rank failing (a checkpoint it must not resume).
        self._fatal = ""
        #: Each restart unit's (None: the group's) last failure before a first step.
        self._early_failures: dict[int | None, dict[EarlyFailure, int]] = {}
        self.stopping = False
        self._ran = False
        self._stop_requested = trio.Event()
        self._force_requested = trio.Event()
        self._committer: Committer | None = None
        #: The current group attempt's live session (live jobs only), set by the policy.
        self._live: LiveSession | None = None
        if spec.checkpoint_url:
            from rankwarden.checkpoint import CheckpointStore

            self._committer = Committer(self, CheckpointStore(spec.checkpoint_url, self.job_id))

    # -- public API ------------------------------------------------------------------

    @property
    def state(self) -> JobState:
        return self._state

    @property
    def attempt(self) -> int:
        return self._attempt

    @property
    def token(self) -> str:
        """The ranks' heartbeat token (a successor coordinator needs it to adopt them)."""
        return self._token

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> JobSnapshot:
        """Run the job to its end. ``task_status.started(self)`` once ranks can connect."""
        if self._ran:
            raise RuntimeError("a Coordinator runs one job once; create a new one")
        self._ran = True
        if self._adopt and isinstance(self.launcher, AdoptsRanks):
            self._adopted = await self.launcher.adopt(self.job_id)
        if self._committer is not None:
            # Before anything starts: a store that cannot be read fails the run here, clearly.
            # Adopted ranks may be writing into staging: leave it alone then.
            try:
                await self._committer.start(cleanup=not self._adopted)
            except OSError as exc:
                raise CheckpointError(f"checkpoint store {self.spec.checkpoint_url!r} is not usable: {exc}") from exc
        self.job_dir.prepare(msgspec.json.format(msgspec.json.encode(self.spec)))
        listeners = self._listeners
        owned = listeners is None
        if listeners is None:
            listeners = await trio.open_tcp_listeners(self._heartbeat_port, host=self._heartbeat_host)
        try:
            port = listeners[0].socket.getsockname()[1]  # type: ignore[attr-defined]
            self.address = f"{self._advertise_host}:{port}"
        except AttributeError:
            self.address = "memory"
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(functools.partial(serve_heartbeats, listeners, self, tune_gc=self._tune_gc))
                if self._committer is not None:
                    nursery.start_soon(self._committer.run)
                self._started_at = self.wall_time()
                self._state = JobState.RUNNING
                self.emit(
                    JobStarted,
                    world_size=self.spec.world_size,
                    entrypoint=self.spec.entrypoint,
                    job_dir=str(self.job_dir.path),
                    coordinator=self.address,
                )
                log.info("job=%s started: %d ranks, logs in %s", self.job_id, self.spec.world_size, self.job_dir.path)
                task_status.started(self)
                final = await RestartPolicy(self).run()
                if self._committer is not None:
                    # Steps every rank reported (a last save(wait=False), a stop's
                    # checkpoint) are committed before the job is over.
                    with trio.move_on_after(COMMIT_DRAIN_TIMEOUT):
                        await self._committer.drain()
                nursery.cancel_scope.cancel()
            if self._committer is not None:
                # Every rank is gone: what they staged and never committed is garbage now.
                try:
                    await self._committer.finish()
                except OSError as exc:
                    log.warning("job=%s: removing uncommitted checkpoint data failed: %s", self.job_id, exc)
            self._end(final)
        finally:
            if not self._state.finished:
                # Cancelled from outside (or a bug): ranks are already stopped by
                # their shielded teardown; record the end rather than vanish.
                self._stop_reason = self._stop_reason or "coordinator cancelled"
                self._end(JobState.STOPPED)
            if isinstance(self.launcher, ReleasesJobs):
                # What the launcher holds for the whole job (a pod launcher's Service, a zygote).
                with trio.CancelScope(shield=True):
                    await self.launcher.release(self.job_id)
            self.job_dir.close()
            if owned:
                with trio.CancelScope(shield=True):
                    for listener in listeners:
                        await listener.aclose()
        return self.snapshot()

    def stop(self, reason: str = "stop requested", *, force: bool = False) -> None:
        """Stop the job: ranks get Drain and SIGTERM, then SIGKILL after ``stop_grace``.

        ``force`` skips the grace. Safe to call repeatedly and from any task."""
        if self._state.finished:
            return
        if not self.stopping:
            self.stopping = True
            self._stop_reason = reason
            self._state = JobState.STOPPING
            self.emit(Stopping, attempt=self._attempt, reason=reason)
        self._stop_requested.set()
        if force:
            self._force_requested.set()

    async def wait(self) -> JobSnapshot:
        await self._events.wait_closed()
        return self.snapshot()

    def events(self, since: int = 0):
        """Every event from index ``since`` on (an async iterator); the iteration ends with the job."""
        return self._events.follow(since)

    def history(self) -> list[Event]:
        """Every event emitted so far, in order (a copy)."""
        return self._events.history()

    def next_event_signal(self) -> trio.Event:
        """Set when the next event is emitted: followers of events.jsonl wait on it."""
        return self._events.next_signal()

    @property
    def failures(self) -> list[Failure]:
        return list(self._failures)

    @property
    def world_size(self) -> int:
        """How many ranks the current attempt has (``spec.world_size`` unless nodes were lost)."""
        return self._world_size

    def snapshot(self) -> JobSnapshot:
        ranks = []
        for rank in range(self._world_size):
            runner = self._runners.get(rank)
            if runner is None:
                ranks.append(RankSnapshot(rank=rank, attempt=self._attempt, state=RankState.PENDING))
            else:
                ranks.append(runner.snapshot())
        return JobSnapshot(
            job_id=self.job_id,
            state=self._state,
            attempt=self._attempt,
            restarts_used=self._restarts_used,
            max_restarts=self.spec.max_restarts,
            world_size=self._world_size,
            ranks=ranks,
            failures=list(self._failures),
            job_dir=str(self.job_dir.path),
            coordinator=self.address,
            checkpoint_step=self._committer.committed_step if self._committer else None,
            started_at=self._started_at,
            ended_at=self._ended_at,
        )

    def failure_report(self) -> str:
        """Human report: the first observed failure first (the root cause), then the rest."""
        return failure_report(self.job_id, self._failures, restarts_used=self._restarts_used,
                              max_restarts=self.spec.max_restarts, fatal=self._fatal)

    def _end(self, state: JobState) -> None:
        self._state = state
        self._ended_at = self.wall_time()
        if state == JobState.SUCCEEDED:
            self.emit(JobSucceeded, attempt=self._attempt)
            log.info("job=%s succeeded (attempt %d)", self.job_id, self._attempt)
        elif state == JobState.FAILED:
            report = self.failure_report()
            self.emit(JobFailedEvent, attempt=self._attempt, message=report, failures=list(self._failures))
            log.warning("%s", report)
        else:
            self.emit(JobStopped, attempt=self._attempt, reason=self._stop_reason)
            log.info("job=%s stopped: %s", self.job_id, self._stop_reason)
        self.job_dir.write_result(self.snapshot())
        self._events.close()

    # -- for RankRunner ------------------------------------------------------------

    def wall_time(self) -> float:
        return time.time()

    def emit(self, kind: type[Event], **fields: Any) -> Event:
        event = kind(job=self.job_id, time=self.wall_time(), **fields)
        self._events.append(event)
        self.job_dir.append_event(event_to_json(event))
        return event

    def record_failure(self, failure: Failure) -> None:
        self._failures.append(failure)

    def build_request(self, rank: int, attempt: int) -> LaunchRequest:
        files = self.job_dir.rank_files(rank, attempt)
        stdout, stderr = files.stdout, files.stderr
        placement = self._placement
        env = rank_env(
            self.spec,
            job_id=self.job_id,
            rank=rank,
            attempt=attempt,
            master_port=self._master_port or 0,
            coordinator=self.address,
            token=self._token,
            checkpoint_tag=self._checkpoint_tag(attempt),
            placement=placement,
            error_file=str(files.error_file),
            world_size=self._world_size,
        )
        return LaunchRequest(
            job_id=self.job_id,
            rank=rank,
            local_rank=rank,
            attempt=attempt,
            argv=rank_argv(self.spec, placement),
            env=env,
            cwd=self.spec.cwd,
            stdout_path=str(stdout),
            stderr_path=str(stderr),
            image=self.spec.image,
            resources=self.spec.resources,
            warm=self.spec.warm,
        )

    def _checkpoint_tag(self, attempt: int) -> str:
        # Ranks of one group attempt share a staging area, so a dead attempt's
        # files can never be committed with a later attempt's. In scope `rank`
        # ranks restart alone and share one for the whole job.
        return f"a{attempt}" if self.spec.restart_scope == RestartScope.GROUP else "r"

    def checkpoint_ready(self, runner: RankRunner, message: protocol.CheckpointReady) -> None:
        if self._committer is None:
            log.warning("job=%s rank=%d reported checkpoint step %d, but the job has no checkpoint_url",
                        self.job_id, runner.rank, message.step)
            return
        self._committer.ready(self._checkpoint_tag(runner.attempt), runner.rank, message)

    def checkpoint_failed(self, runner: RankRunner, message: protocol.CheckpointFailed) -> None:
        if self._committer is not None:
            self._committer.failed(runner.rank, runner.attempt, message)

    def live_message(self, runner: RankRunner, message) -> None:
        if self._live is not None and self._runners.get(runner.rank) is runner:
            self._live.on_message(runner, message)
        else:
            log.warning("job=%s rank=%d sent %s, but the job is not live (JobSpec.live)",
                        self.job_id, runner.rank, type(message).__name__)

    def broadcast(self, message) -> None:
        for runner in list(self._runners.values()):
            runner.send(message)

    # -- for the heartbeat server (PeerRouter) ----------------------------------------

    def authenticate(self, hello: protocol.Hello, peer: Peer) -> RankRunner:
        if hello.version != protocol.PROTOCOL_VERSION:
            raise ProtocolError(
                f"rank speaks heartbeat protocol version {hello.version}, this coordinator speaks "
                f"{protocol.PROTOCOL_VERSION}; run the same rankwarden version on both sides"
            )
        if not hmac.compare_digest(hello.token.encode(), self._token.encode()):
            raise AuthError("wrong job token")
        if hello.job != self.job_id:
            raise AuthError(f"hello for job {hello.job!r}, this coordinator runs {self.job_id!r}")
        runner = self._runners.get(hello.rank)
        if runner is None:
            raise AuthError(f"rank {hello.rank} is not part of this job (world size {self._world_size})")
        if hello.attempt != runner.attempt:
            raise AuthError(f"rank {hello.rank} hello for attempt {hello.attempt}, current attempt is {runner.attempt}")
        if runner.peer is not None:
            raise AuthError(f"rank {hello.rank} of attempt {hello.attempt} is already connected")
        if runner.state not in (RankState.STARTING, RankState.RUNNING):
            raise AuthError(f"rank {hello.rank} of attempt {hello.attempt} has already ended")
        runner.attach(peer, hello)
        return runner

    def peer_rejected(self, peer_name: str, reason: str, rank: int | None) -> None:
        log.warning("job=%s: dropped heartbeat peer %s: %s", self.job_id, peer_name, reason)
        self.emit(PeerRejected, attempt=self._attempt, rank=rank, reason=reason, peer=peer_name)


async def run_job(spec: JobSpec, **kwargs: Any) -> JobSnapshot:
    """Run ``spec`` to its end in a nursery of its own and return the final snapshot."""
    coordinator = Coordinator(spec, **kwargs)
    return await coordinator.run()
