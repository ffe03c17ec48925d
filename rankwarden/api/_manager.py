"""The server's jobs: each one a Coordinator in the manager's nursery, mirrored to SQLite.

Lifetimes: ``JobManager.run`` owns one nursery for the server's life; every job
is a task in it that owns its coordinator, its log collector and its
progress sampler. While ``run`` is active ``self._nursery`` points at that
nursery so request handlers can start jobs; it is cleared when ``run`` ends.

Server restarts: a job whose row says it was still going when the previous
server died is resumed (a new coordinator with the same id and job
directory: ranks restart from the newest committed checkpoint) or marked
``interrupted``, as the operator chose. A job is never silently dropped. On a
graceful server shutdown running jobs are left marked as running, so the
next start treats them the same way.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import trio

from rankwarden.api._admission import check_allowed
from rankwarden.api._db import JobDB
from rankwarden.api._schema import JobInfo, JobRequest, JobSummary
from rankwarden.coordinator import Coordinator
from rankwarden.coordinator._jobdir import RankOutputTail
from rankwarden.events import JobSnapshot, RankFailed
from rankwarden.errors import ApiError, SpecError
from rankwarden.spec import JobSpec

__all__ = ["JobManager", "ServerConfig"]

log = logging.getLogger(__name__)

ACTIVE = ("pending", "running", "restarting", "stopping")
_SAMPLE = 0.5  # seconds between progress samples for summaries
_LOG_COPY = 0.1  # seconds between copies of rank output into the job's combined log


@dataclass
class ServerConfig:
    state_dir: str
    allow: list[str] = field(default_factory=list)
    on_restart: str = "resume"  # or "interrupt"
    checkpoint_root: str | None = None
    #: How ranks run: None for local processes, or a Launcher (an open PodLauncher).
    launcher: Any = None
    #: Where ranks reach the heartbeat server: loopback for local ranks; for
    #: pods, all interfaces and this pod's IP (or a stable DNS name).
    heartbeat_host: str = "127.0.0.1"
    advertise_host: str | None = None


@dataclass
class _Live:
    coordinator: Coordinator
    request: JobRequest
    started: float
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (time, min step, samples)
    failures_at: list[float] = field(default_factory=list)
    recoveries: list[float] = field(default_factory=list)
    new_log_line: trio.Event = field(default_factory=trio.Event)
    user_stopped: bool = False
    tail: RankOutputTail | None = None  # where copying rank output stopped
    log_seq: int = 0  # lines in the combined log so far


class JobManager:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.state_dir = Path(config.state_dir).absolute()
        self.db = JobDB(self.state_dir / "jobs.sqlite3")
        self.live: dict[str, _Live] = {}
        self._nursery: trio.Nursery | None = None
        self._shutting_down = False

    # -- lifetime ---------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._recover()
                if hasattr(self.config.launcher, "release_orphans"):
                    nursery.start_soon(self._release_orphans)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def shutdown(self) -> None:
        self._shutting_down = True
        detach = getattr(self.config.launcher, "detach", None)
        if detach is not None:
            detach()  # pods keep running; the next server adopts them

    async def _release_orphans(self) -> None:
        # Services of jobs that no longer run here (a server died mid-teardown).
        try:
            released = await self.config.launcher.release_orphans(set(self.live))
        except Exception as exc:  # housekeeping must not take the server down
            log.warning("could not release orphaned job Services: %s", exc)
            return
        for job_id in released:
            log.info("job=%s: deleted its orphaned Service", job_id)

    def _recover(self) -> None:
        jobs, _ = self.db.list(states=list(ACTIVE), limit=1_000_000)
        for info in jobs:
            if self.config.on_restart == "resume":
                try:
                    request = self.check_allowed(info.request)
                except ApiError as exc:
                    # The operator may have narrowed --allow since: a job a new
                    # submit would refuse must not run either.
                    log.warning("job=%s: not resumed: %s", info.job_id, exc.message)
                    self.db.update(info.job_id, state="failed",
                                   reason=f"not resumed after a server restart: no longer allowed: {exc.message}")
                    continue
                log.info("job=%s was running when the server stopped; resuming it", info.job_id)
                self.db.update(info.job_id, reason="resumed after a server restart")
                self._start(info.job_id, request, resumed=True)
            else:
                self.db.update(info.job_id, state="interrupted", reason="the server stopped while the job was running")

    # -- requests -----------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        return self.state_dir / "jobs" / job_id

    def check_allowed(self, request: JobRequest) -> JobRequest:
        """The request with its entrypoint resolved, if the allowlist admits it (else ApiError)."""
        resolved = check_allowed(request, self.config.allow)
        return msgspec.structs.replace(request, entrypoint=resolved)

    def submit(self, request: JobRequest) -> JobInfo:
        if self._nursery is None:
            raise ApiError(503, "the server is shutting down")
        # The record keeps the real path: a symlink re-pointed later, or a
        # relative path resolved from another cwd, cannot change what runs.
        request = self.check_allowed(request)
        job_id = request.job_id or f"job-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        if self.db.exists(job_id):
            raise ApiError(409, f"job {job_id} already exists", "pick another job_id, or delete the old job")
        try:
            JobSpec.from_dict(msgspec.to_builtins(self._spec(job_id, request)))
        except SpecError as exc:
            raise ApiError(400, str(exc), f"at {exc.path}") from None
        info = self.db.insert(job_id, request, "pending")
        self._start(job_id, request)
        return info

    def _spec(self, job_id: str, request: JobRequest) -> JobSpec:
        checkpoint_url = None
        if request.checkpoint:
            checkpoint_url = self.config.checkpoint_root or str(self.state_dir / "checkpoints")
        return JobSpec(
            entrypoint=request.entrypoint, args=list(request.args), module=request.module, world_size=request.world_size,
            job_id=job_id, job_dir=str(self.job_dir(job_id)), checkpoint_url=checkpoint_url,
            heartbeat_timeout=request.heartbeat_timeout, progress_timeout=request.progress_timeout,
            max_restarts=request.max_restarts, restart_scope=request.restart_scope,
            keep_checkpoints=request.keep_checkpoints, resources=request.resources,
        )

    def _start(self, job_id: str, request: JobRequest, resumed: bool = False) -> None:
        assert self._nursery is not None
        launcher = self.config.launcher
        kwargs: dict[str, Any] = {}
        if self._ranks_are_remote:
            # Pods outlive this server: a resumed job adopts them, and they
            # reconnect with the token and port the job had before.
            token, port = self._identity(job_id)
            kwargs = {"token": token, "heartbeat_port": port, "adopt": resumed}
        coordinator = Coordinator(
            self._spec(job_id, request), launcher=launcher, heartbeat_host=self.config.heartbeat_host,
            advertise_host=self.config.advertise_host, **kwargs,
        )
        live = _Live(coordinator=coordinator, request=request, started=time.time())
        self.live[job_id] = live
        self._nursery.start_soon(self._run_job, job_id, live)

    async def _run_job(self, job_id: str, live: _Live) -> None:
        coordinator = live.coordinator
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(coordinator.run)
                if self._ranks_are_remote:
                    self._save_identity(job_id, coordinator)
                self.db.update(job_id, state="running")
                nursery.start_soon(self._mirror_events, job_id, live)
                nursery.start_soon(self._sample, live)
                nursery.start_soon(self._collect_logs, job_id, live)
                await coordinator.wait()
                self._copy_logs(job_id, live, final=True)
                nursery.cancel_scope.cancel()
        except Exception as exc:  # a job's crash must never take the server down
            log.exception("job=%s: coordinator failed", job_id)
            self.db.update(job_id, state="failed", reason=f"coordinator error: {exc}")
        finally:
            snapshot = coordinator.snapshot()
            if self._shutting_down and not live.user_stopped:
                self.db.update(job_id, reason="the server shut down while the job was running")
            elif snapshot.state.finished:
                reason = {"failed": coordinator.failure_report() if snapshot.failures else "",
                          "stopped": "stopped through the API" if live.user_stopped else ""}.get(snapshot.state.value, "")
                self.db.update(job_id, state=snapshot.state.value, attempt=snapshot.attempt,
                               restarts=snapshot.restarts_used, reason=reason)
            live.new_log_line.set()

    async def _mirror_events(self, job_id: str, live: _Live) -> None:
        async for event in live.coordinator.events():
            snap = live.coordinator.snapshot()
            if not snap.state.finished:
                self.db.update(job_id, state=snap.state.value, attempt=snap.attempt, restarts=snap.restarts_used)
            if isinstance(event, RankFailed):
                live.failures_at.append(time.time())

    async def _sample(self, live: _Live) -> None:
        # Summaries need rates and recovery times; the coordinator keeps only
        # the present. Sampling its snapshot twice a second is enough for both.
        pending_recovery: float | None = None
        attempt_seen = 0
        while True:
            snap = live.coordinator.snapshot()
            now = time.time()
            steps = [r.step for r in snap.ranks]
            if live.failures_at and pending_recovery is None and len(live.recoveries) < len(live.failures_at):
                pending_recovery, attempt_seen = live.failures_at[len(live.recoveries)], snap.attempt
            if all(s is not None for s in steps):
                samples = sum(r.samples or 0 for r in snap.ranks)
                live.samples.append((now, min(steps), samples))  # type: ignore[type-var]
                if pending_recovery is not None and snap.attempt > attempt_seen:
                    live.recoveries.append(now - pending_recovery)
                    pending_recovery = None
            await trio.sleep(_SAMPLE)

    # -- a job's heartbeat identity (pod launchers) ---------------------------------------

    @property
    def _ranks_are_remote(self) -> bool:
        """Ranks run off this host (pods) and outlive this server."""
        return hasattr(self.config.launcher, "placement")

    def _identity_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "coordinator.json"

    def _identity(self, job_id: str) -> tuple[str, int]:
        try:
            saved = msgspec.json.decode(self._identity_path(job_id).read_bytes())
            return str(saved["token"]), int(saved["port"])
        except (OSError, msgspec.DecodeError, KeyError, TypeError, ValueError):
            return secrets.token_urlsafe(32), 0

    def _save_identity(self, job_id: str, coordinator: Coordinator) -> None:
        port = int(coordinator.address.rpartition(":")[2])
        path = self._identity_path(job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the ranks' token
        with os.fdopen(fd, "wb") as f:
            f.write(msgspec.json.encode({"token": coordinator.token, "port": port}))
        os.replace(tmp, path)

    # -- logs ---------------------------------------------------------------------------

    def combined_log(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "logs.jsonl"

    async def _collect_logs(self, job_id: str, live: _Live) -> None:
        # Rank output is in per-rank files (it survives the server); this copies
        # new lines into one numbered log so SSE clients can resume by id.
        while True:
            self._copy_logs(job_id, live)
            await trio.sleep(_LOG_COPY)

    def _copy_logs(self, job_id: str, live: _Live, *, final: bool = False) -> None:
        if live.tail is None:
            live.tail = RankOutputTail(live.coordinator.job_dir)
            self._resume_numbering(job_id, live)
        ranks = [(r.rank, r.attempt) for r in live.coordinator.snapshot().ranks]
        written = []
        for line in live.tail.read(ranks, final=final):
            live.log_seq += 1
            written.append(msgspec.json.encode({"id": live.log_seq, "attempt": line.attempt, "rank": line.rank,
                                                "stream": line.stream, "line": line.text.decode(errors="replace")}))
        if written:
            with open(self.combined_log(job_id), "ab") as f:
                f.write(b"\n".join(written) + b"\n")
            live.new_log_line.set()
            live.new_log_line = trio.Event()

    def _resume_numbering(self, job_id: str, live: _Live) -> None:
        # A resumed job's combined log already holds what the previous server
        # copied: continue its numbering and skip those bytes of the rank files.
        path = self.combined_log(job_id)
        if not path.exists():
            return
        assert live.tail is not None
        with open(path, "rb") as f:
            for raw in f:
                line = msgspec.json.decode(raw)
                live.log_seq += 1
                stdout, stderr = live.coordinator.job_dir.log_paths(line["rank"], line["attempt"])
                key = str(stdout if line["stream"] == "stdout" else stderr)
                live.tail.offsets[key] = live.tail.offsets.get(key, 0) + len(line["line"].encode()) + 1

    # -- views ---------------------------------------------------------------------------

    def get(self, job_id: str) -> JobInfo:
        info = self.db.get(job_id)
        if info is None:
            raise ApiError(404, f"no job {job_id}")
        return info

    def snapshot(self, job_id: str) -> JobSnapshot | None:
        live = self.live.get(job_id)
        if live is not None:
            return live.coordinator.snapshot()
        result = self.job_dir(job_id) / "result.json"
        if result.exists():
            return msgspec.json.decode(result.read_bytes(), type=JobSnapshot)
        return None

    def summary(self, job_id: str) -> JobSummary:
        info = self.get(job_id)
        snap = self.snapshot(job_id)
        live = self.live.get(job_id)
        steps_rate = samples_rate = eta = goodput = None
        recoveries: list[float] = []
        wall = 0.0
        if live is not None:
            wall = (snap.ended_at or time.time()) - live.started if snap else 0.0
            recent = [s for s in live.samples if s[0] >= live.samples[-1][0] - 10.0] if live.samples else []
            if len(recent) >= 2 and recent[-1][0] > recent[0][0] and recent[-1][1] >= recent[0][1]:
                span = recent[-1][0] - recent[0][0]
                steps_rate = (recent[-1][1] - recent[0][1]) / span
                samples_rate = max(0, recent[-1][2] - recent[0][2]) / span
            recoveries = [round(r, 3) for r in live.recoveries]
            goodput = _goodput(live.samples, wall)
        step = min((r.step for r in snap.ranks if r.step is not None), default=None) if snap else None
        total = info.request.total_steps
        if total and step is not None and steps_rate:
            eta = max(0.0, (total - step) / steps_rate)
        return JobSummary(
            job_id=job_id, state=info.state, attempt=snap.attempt if snap else info.attempt,
            restarts_used=snap.restarts_used if snap else info.restarts_used,
            max_restarts=info.request.max_restarts, ranks=list(snap.ranks) if snap else [],
            steps_per_second=steps_rate, samples_per_second=samples_rate, step=step, total_steps=total,
            eta_seconds=eta, checkpoint_step=snap.checkpoint_step if snap else None,
            failures=list(snap.failures) if snap else [], recovery_seconds=recoveries, goodput=goodput,
            wall_seconds=round(wall, 3),
        )

    # -- actions -------------------------------------------------------------------------

    def stop(self, job_id: str) -> JobInfo:
        info = self.get(job_id)
        live = self.live.get(job_id)
        if live is None or live.coordinator.state.finished:
            raise ApiError(409, f"job {job_id} is {info.state}, not running")
        live.user_stopped = True
        live.coordinator.stop("stopped through the API")
        return self.get(job_id)

    def delete(self, job_id: str) -> None:
        info = self.get(job_id)
        if info.state in ACTIVE:
            raise ApiError(409, f"job {job_id} is {info.state}", "stop it first (POST /jobs/{id}/stop), then delete it")
        self.db.delete(job_id)
        self.live.pop(job_id, None)
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def purge(self, states: list[str], older_than: float) -> list[str]:
        jobs, _ = self.db.list(states=states, limit=1_000_000)
        cutoff = time.time() - older_than
        purged = [j.job_id for j in jobs if j.updated_at <= cutoff]
        for job_id in purged:
            self.delete(job_id)
        return purged

    def events_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "events.jsonl"

    def is_active(self, job_id: str) -> bool:
        live = self.live.get(job_id)
        return live is not None and not live.coordinator.state.finished

    def wakeup(self, job_id: str) -> trio.Event | None:
        live = self.live.get(job_id)
        return live.new_log_line if live is not None else None


def _goodput(samples: list[tuple[float, int, int]], wall: float) -> float | None:
    # Time spent moving past the furthest step reached so far counts as
    # useful; time re-training steps lost to a failure, restarting or waiting does not.
    if wall <= 0 or len(samples) < 2:
        return None
    best, useful = samples[0][1], 0.0
    for (t0, _, _), (t1, step, _) in zip(samples, samples[1:]):
        if step > best:
            useful += t1 - t0
            best = step
    return round(min(1.0, useful / wall), 4)

