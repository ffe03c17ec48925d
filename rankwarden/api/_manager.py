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

import functools
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

from rankwarden.api._admission import Limits, check_allowed, check_job_id, check_limits
from rankwarden.api._db import JobDB
from rankwarden.api._logs import LogCopier, ensure_private_dir
from rankwarden.api._metrics_store import MetricsRecorder
from rankwarden.api._schema import ACTIVE, DeleteResult, JobInfo, JobRequest, JobSummary
from rankwarden.checkpoint import CheckpointStore
from rankwarden.api._summaries import Sampler, build_summary
from rankwarden.api._templates import Template, expand
from rankwarden.coordinator import Coordinator
from rankwarden.events import JobSnapshot, RankFailed
from rankwarden.errors import ApiError, CheckpointError, SpecError
from rankwarden.launcher import Detaches, Launcher, PlacesRanks, ReleasesOrphans
from rankwarden.spec import JobSpec

__all__ = ["JobManager", "ServerConfig"]

log = logging.getLogger(__name__)

_PURGE_BATCH = 500  # jobs per purge batch: one transaction, then the loop runs again


@dataclass
class ServerConfig:
    state_dir: str
    allow: list[str] = field(default_factory=list)
    on_restart: str = "resume"  # or "interrupt"
    checkpoint_root: str | None = None
    #: How ranks run: None for local processes, or a Launcher (an open PodLauncher).
    launcher: Launcher | None = None
    #: Where ranks reach the heartbeat server: loopback for local ranks; for
    #: pods, all interfaces and this pod's IP (or a stable DNS name).
    heartbeat_host: str = "127.0.0.1"
    advertise_host: str | None = None
    #: Server-wide limits (ranks, jobs, timeouts, restarts).
    limits: Limits = field(default_factory=Limits)
    #: Job templates by name (``load_templates``): what submitters may run without --allow.
    templates: dict[str, Template] = field(default_factory=dict)


@dataclass
class _Live:
    coordinator: Coordinator
    request: JobRequest
    sampler: Sampler
    logs: LogCopier
    user_stopped: bool = False
    #: Started again by a restarted server (its record says so when it ends, too).
    resumed: bool = False
    #: Set once the job's final state is in the database (after its coordinator ended).
    recorded: trio.Event = field(default_factory=trio.Event)
    #: The job's user metrics as downsampled series (the dashboard's charts).
    metrics: MetricsRecorder | None = None

    def ranks(self) -> list[tuple[int, int]]:
        return [(r.rank, r.attempt) for r in self.coordinator.snapshot().ranks]


class JobManager:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.state_dir = Path(config.state_dir).absolute()
        ensure_private_dir(self.state_dir)
        self.db = JobDB(self.state_dir / "jobs.sqlite3")
        self.live: dict[str, _Live] = {}
        self._nursery: trio.Nursery | None = None
        self._shutting_down = False

    # -- lifetime ---------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._recover()
                if isinstance(self.config.launcher, ReleasesOrphans):
                    nursery.start_soon(self._release_orphans)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def shutdown(self) -> None:
        self._shutting_down = True
        if isinstance(self.config.launcher, Detaches):
            self.config.launcher.detach()  # pods keep running; the next server adopts them

    async def _release_orphans(self) -> None:
        # Services of jobs that no longer run here (a server died mid-teardown).
        assert isinstance(self.config.launcher, ReleasesOrphans)
        try:
            released = await self.config.launcher.release_orphans(set(self.live))
        except Exception as exc:  # housekeeping must not take the server down
            log.warning("could not release orphaned job Services: %s", exc)
            return
        for job_id in released:
            log.info("job=%s: deleted its orphaned Service", job_id)

    async def _recover(self) -> None:
        jobs, _ = await self.db.list(states=list(ACTIVE), limit=1_000_000)
        for info in jobs:
            if await self.db.stop_requested(info.job_id):
                # The server died while the job was stopping: the stop stands.
                await self.db.update(info.job_id, state="stopped",
                                     reason="stopped through the API (the server restarted while it was stopping)")
            elif self.config.on_restart == "resume":
                try:
                    request = await trio.to_thread.run_sync(self.admit, info.job_id, info.request)
                except ApiError as exc:
                    # The operator may have narrowed --allow since: a job a new
                    # submit would refuse must not run either.
                    log.warning("job=%s: not resumed: %s", info.job_id, exc.message)
                    await self.db.update(info.job_id, state="failed",
                                         reason=f"not resumed after a server restart: no longer allowed: {exc.message}")
                    continue
                log.info("job=%s was running when the server stopped; resuming it", info.job_id)
                await self.db.update(info.job_id, reason="resumed after a server restart")
                self._start(info.job_id, request, run_id=_run_id(info), resumed=True,
                            before=(info.attempt, info.restarts_used))
            else:
                await self.db.update(info.job_id, state="interrupted",
                                     reason="the server stopped while the job was running")

    # -- requests -----------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        return self.state_dir / "jobs" / job_id

    def admit(self, job_id: str, request: JobRequest) -> JobRequest:
        """The request to run (entrypoint resolved, template expanded) if it is admitted; else ApiError.

        Called at submit and again when a restarted server resumes the job, so
        a narrowed --allow or a changed template applies to recorded jobs too.
        Blocking (it resolves paths): call it in a worker thread."""
        if request.template is None:
            if not request.entrypoint:
                raise ApiError(400, "name an entrypoint or a template")
            if request.params:
                raise ApiError(400, "params are for templates; an entrypoint takes args")
            resolved = check_allowed(request, self.config.allow)
            return msgspec.structs.replace(request, entrypoint=resolved)
        if request.job_id is not None:
            check_job_id(request.job_id)
        template = self.config.templates.get(request.template)
        if template is None:
            raise ApiError(403, f"no job template {request.template!r} on this server",
                           f"templates: {', '.join(sorted(self.config.templates)) or 'none'}")
        if request.entrypoint or request.args or request.module:
            raise ApiError(400, "a templated job takes params only (no entrypoint, args or module)")
        if request.world_size > template.max_world_size:
            raise ApiError(422, f"template {request.template!r} runs at most {template.max_world_size} ranks, "
                                f"asked for {request.world_size}")
        args = expand(template, request.template, dict(request.params), self.job_dir(job_id))
        entrypoint = template.entrypoint if template.module else os.path.realpath(template.entrypoint)
        return msgspec.structs.replace(request, entrypoint=entrypoint, args=args, module=template.module)

    async def submit(self, request: JobRequest) -> JobInfo:
        if self._nursery is None or self._shutting_down:
            raise ApiError(503, "the server is shutting down")
        job_id = request.job_id or f"job-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        run = await trio.to_thread.run_sync(self.admit, job_id, request)
        # The record keeps the real path: a symlink re-pointed later, or a
        # relative path resolved from another cwd, cannot change what runs.
        # A templated job keeps its template and params (expanded again on resume).
        record = request if request.template is not None else run
        active = [live for live in self.live.values() if not live.coordinator.state.finished]
        check_limits(run, self.config.limits, running_jobs=len(active),
                     running_ranks=sum(live.request.world_size for live in active))
        if job_id in self.live or await self.db.exists(job_id):
            raise ApiError(409, f"job {job_id} already exists", "pick another job_id, or delete the old job")
        try:
            JobSpec.from_dict(msgspec.to_builtins(self._spec(job_id, run)))
        except SpecError as exc:
            raise ApiError(400, str(exc), f"at {exc.path}") from None
        info = await self.db.insert(job_id, record, "pending")
        self._start(job_id, run, run_id=_run_id(info))
        return info

    def _checkpoint_url(self, request: JobRequest) -> str | None:
        # Every job's store is <root>/<job_id>: the server owns it, and deletes it with the job.
        if not request.checkpoint:
            return None
        return self.config.checkpoint_root or str(self.state_dir / "checkpoints")

    def _spec(self, job_id: str, request: JobRequest, run_id: str = "") -> JobSpec:
        checkpoint_url = self._checkpoint_url(request)
        return JobSpec(
            run_id=run_id,
            entrypoint=request.entrypoint, args=list(request.args), module=request.module,
            world_size=request.world_size, job_id=job_id, job_dir=str(self.job_dir(job_id)),
            checkpoint_url=checkpoint_url, heartbeat_timeout=request.heartbeat_timeout,
            progress_timeout=request.progress_timeout, max_restarts=request.max_restarts,
            restart_scope=request.restart_scope,
            keep_checkpoints=request.keep_checkpoints, resources=request.resources,
        )

    def _start(self, job_id: str, request: JobRequest, *, run_id: str, resumed: bool = False,
               before: tuple[int, int] = (0, 0)) -> None:
        assert self._nursery is not None
        kwargs: dict[str, Any] = {}
        if self._ranks_are_remote:
            # Pods outlive this server: a resumed job adopts them, and they
            # reconnect with the token and port the job had before.
            token, port = self._identity(job_id)
            kwargs = {"token": token, "heartbeat_port": port, "adopt": resumed}
        ensure_private_dir(self.job_dir(job_id) / "outputs")  # where templated jobs write their files
        # A resumed job goes on counting attempts and restarts where the
        # previous server stopped: a server restart grants no fresh budget,
        # and new attempts never reuse the old ones' log files.
        coordinator = Coordinator(
            self._spec(job_id, request, run_id), launcher=self.config.launcher,
            heartbeat_host=self.config.heartbeat_host, advertise_host=self.config.advertise_host,
            attempts_before=before[0], restarts_before=before[1], **kwargs,
        )
        live = _Live(coordinator=coordinator, request=request, sampler=Sampler(coordinator), resumed=resumed,
                     logs=LogCopier(coordinator.job_dir, self.combined_log(job_id)))
        live.metrics = MetricsRecorder(job_id, coordinator.snapshot, lambda: live.sampler.steps_per_second(),
                                       self.job_dir(job_id) / "metrics.json")
        self.live[job_id] = live
        self._nursery.start_soon(self._run_job, job_id, live)

    async def _run_job(self, job_id: str, live: _Live) -> None:
        coordinator = live.coordinator
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(coordinator.run)
                if self._ranks_are_remote:
                    await trio.to_thread.run_sync(self._save_identity, job_id, coordinator)
                await self.db.update(job_id, state="running")
                nursery.start_soon(self._mirror_events, job_id, live)
                nursery.start_soon(live.sampler.run)
                nursery.start_soon(live.logs.run, live.ranks)
                nursery.start_soon(live.metrics.run)  # type: ignore[union-attr]
                await coordinator.wait()
                await live.logs.copy(live.ranks(), final=True)
                nursery.cancel_scope.cancel()
        except Exception as exc:  # a job's crash must never take the server down
            log.exception("job=%s: coordinator failed", job_id)
            with trio.CancelScope(shield=True):
                await self.db.update(job_id, state="failed", reason=f"coordinator error: {exc}")
        finally:
            snapshot = coordinator.snapshot()
            try:
                with trio.CancelScope(shield=True):
                    if self._shutting_down and not live.user_stopped:
                        await self.db.update(job_id, reason="the server shut down while the job was running")
                    elif snapshot.state.finished:
                        # failure_report also covers a job that failed before any rank
                        # did (a checkpoint it must not resume).
                        reason = {"failed": coordinator.failure_report(),
                                  "stopped": "stopped through the API" if live.user_stopped else "",
                                  "succeeded": "resumed after a server restart" if live.resumed else "",
                                  }.get(snapshot.state.value, "")
                        await self.db.update(job_id, state=snapshot.state.value, attempt=snapshot.attempt,
                                             restarts=snapshot.restarts_used, reason=reason)
            finally:
                live.recorded.set()
                live.logs.wake_all()
                if live.metrics is not None:
                    with trio.CancelScope(shield=True):
                        await live.metrics.finish()

    async def _mirror_events(self, job_id: str, live: _Live) -> None:
        async for event in live.coordinator.events():
            snap = live.coordinator.snapshot()
            if not snap.state.finished:
                await self.db.update(job_id, state=snap.state.value, attempt=snap.attempt,
                                     restarts=snap.restarts_used)
            if isinstance(event, RankFailed):
                live.sampler.failures_at.append(time.time())

    # -- a job's heartbeat identity (pod launchers) ---------------------------------------

    @property
    def _ranks_are_remote(self) -> bool:
        """Ranks run off this host (pods) and outlive this server."""
        return isinstance(self.config.launcher, PlacesRanks)

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
        ensure_private_dir(path.parent)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the ranks' token
        with os.fdopen(fd, "wb") as f:
            f.write(msgspec.json.encode({"token": coordinator.token, "port": port}))
        os.replace(tmp, path)

    # -- views ---------------------------------------------------------------------------

    def combined_log(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "logs.jsonl"

    def events_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "events.jsonl"

    async def get(self, job_id: str) -> JobInfo:
        live = self.live.get(job_id)
        if live is not None and live.coordinator.state.finished:
            # Its streams have ended: whoever saw that reads the final record.
            await live.recorded.wait()
        info = await self.db.get(job_id)
        if info is None:
            raise ApiError(404, f"no job {job_id}")
        return info

    async def list(self, states: list[str] | None, offset: int, limit: int) -> tuple[list[JobInfo], int]:
        return await self.db.list(states=states, offset=offset, limit=limit)

    async def snapshot(self, job_id: str) -> JobSnapshot | None:
        live = self.live.get(job_id)
        if live is not None:
            return live.coordinator.snapshot()
        result = self.job_dir(job_id) / "result.json"
        data = await trio.to_thread.run_sync(_read_or_none, result)
        return msgspec.json.decode(data, type=JobSnapshot) if data is not None else None

    async def summary(self, job_id: str) -> JobSummary:
        info = await self.get(job_id)
        live = self.live.get(job_id)
        return build_summary(info, await self.snapshot(job_id), live.sampler if live else None)

    async def active_summaries(self) -> list[JobSummary]:
        jobs, _ = await self.db.list(states=list(ACTIVE), limit=1000)
        return [await self.summary(j.job_id) for j in jobs]

    async def counts(self) -> dict[str, int]:
        return await self.db.counts()

    def live_metrics(self) -> dict[str, tuple[JobSnapshot, float | None]]:
        """Per job this server runs: its snapshot and steps per second."""
        return {job_id: (live.coordinator.snapshot(), live.sampler.steps_per_second()[0])
                for job_id, live in self.live.items()}

    def running(self) -> int:
        return sum(1 for job_id in self.live if self.is_active(job_id))

    def is_active(self, job_id: str) -> bool:
        live = self.live.get(job_id)
        return live is not None and not live.coordinator.state.finished

    def log_wakeup(self, job_id: str) -> trio.Event | None:
        live = self.live.get(job_id)
        return live.logs.new_line if live is not None else None

    def log_copier(self, job_id: str) -> LogCopier | None:
        live = self.live.get(job_id)
        return live.logs if live is not None else None

    def event_wakeup(self, job_id: str) -> trio.Event | None:
        live = self.live.get(job_id)
        return live.coordinator.next_event_signal() if live is not None else None

    # -- actions -------------------------------------------------------------------------

    async def stop(self, job_id: str) -> JobInfo:
        info = await self.get(job_id)
        live = self.live.get(job_id)
        if live is None or live.coordinator.state.finished:
            raise ApiError(409, f"job {job_id} is {info.state}, not running")
        live.user_stopped = True
        # Recorded before the ranks are told: if the server dies while they
        # drain, the next server finishes the stop instead of resuming the job.
        await self.db.update(job_id, stop_requested=True)
        live.coordinator.stop("stopped through the API")
        return await self.get(job_id)

    async def delete(self, job_id: str) -> DeleteResult:
        """Delete a finished job: its record, its directory and its checkpoints.

        Its checkpoints go too: they are resumable only by this job (its run
        id is in every manifest), so a new job that reuses the id starts fresh
        and nothing else could use them. The store is removed first: a delete
        that fails there leaves the job listed, to be deleted again."""
        info = await self.get(job_id)
        if info.state in ACTIVE:
            raise ApiError(409, f"job {job_id} is {info.state}", "stop it first (POST /jobs/{id}/stop), then delete it")
        url = self._checkpoint_url(info.request)
        if url is not None:
            try:
                await trio.to_thread.run_sync(_destroy_checkpoints, url, job_id)
            except (OSError, CheckpointError) as exc:
                raise ApiError(500, f"job {job_id}: deleting its checkpoints at {url}/{job_id} failed: {exc}",
                               "the job is still listed; delete it again") from None
        await self.db.delete_many([job_id])
        self.live.pop(job_id, None)
        await trio.to_thread.run_sync(functools.partial(shutil.rmtree, self.job_dir(job_id), ignore_errors=True))
        return DeleteResult(job_id=job_id, checkpoints="none" if url is None else "deleted",
                            checkpoint_url=None if url is None else f"{url.rstrip('/')}/{job_id}")

    async def purge(self, states: list[str], older_than: float) -> list[str]:
        # In batches: each batch is one short transaction and one thread
        # that removes its directories, so the loop serves heartbeats and
        # other requests between batches however many jobs there are.
        cutoff = time.time() - older_than
        purged: list[str] = []
        while True:
            batch = [j for j in await self.db.finished(states, cutoff, _PURGE_BATCH) if j not in self.live
                     or self.live[j].coordinator.state.finished]
            if not batch:
                return purged
            # Every job's store is <root>/<job_id>; one that never checkpointed has none to remove.
            root = self.config.checkpoint_root or str(self.state_dir / "checkpoints")
            await trio.to_thread.run_sync(_destroy_all_checkpoints, [(root, j) for j in batch])
            await self.db.delete_many(batch)
            for job_id in batch:
                self.live.pop(job_id, None)
            await trio.to_thread.run_sync(_remove_dirs, [self.job_dir(j) for j in batch])
            purged += batch


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _run_id(info: JobInfo) -> str:
    # Unique per submitted job and stable across server restarts: a job that
    # reuses a deleted job's id never resumes the old job's checkpoints.
    return f"{info.job_id}.{int(info.created_at * 1e6)}"


def _destroy_checkpoints(url: str, job_id: str) -> None:
    CheckpointStore(url, job_id).destroy()


def _destroy_all_checkpoints(stores: list[tuple[str, str]]) -> None:
    for url, job_id in stores:
        try:
            _destroy_checkpoints(url, job_id)
        except (OSError, CheckpointError) as exc:  # purge goes on; the failure is in the server log
            log.warning("job=%s: deleting its checkpoints at %s failed: %s", job_id, url, exc)


def _remove_dirs(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
