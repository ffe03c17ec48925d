"""The coordinator's half of the multi-rank checkpoint commit.

Each rank writes its own files for step N into the attempt's staging area and
reports ``CheckpointReady``. When every rank of the job has reported step N
under the same staging tag, one task commits it (in a worker thread: fsspec
is blocking), emits ``checkpoint_committed``, and tells the ranks
``Committed(N)``. A step that some rank never reports is never committed; its
files are removed by ``cleanup`` before the next group attempt starts, when no
rank can be writing. Commits run one at a time, in the order they complete,
so LATEST only moves forward.

Before every attempt the committer also chooses the step that all ranks of
that attempt resume from (``plan_resume``, see ``checkpoint._resume``): the
ranks are told that one step in their ``Welcome`` and never choose on their
own. Every manifest it writes carries the job's fingerprint (``Writer``), so
a later job can tell its own checkpoints from another run's.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import msgspec
import trio

from rankwarden import protocol
from rankwarden.checkpoint import CheckpointStore, FileEntry, ResumePlan, Writer, choose_resume
from rankwarden.errors import CheckpointError
from rankwarden.events import CheckpointCommitted, CheckpointFailedEvent, ResumeChosen, SkippedStepInfo

if TYPE_CHECKING:  # pragma: no cover
    from rankwarden.coordinator._host import CommitHost

__all__ = ["Committer"]

log = logging.getLogger(__name__)


class Committer:
    def __init__(self, job: "CommitHost", store: CheckpointStore) -> None:
        self.job = job
        self.store = store
        self.committed_step: int | None = None
        spec = job.spec
        entrypoint = spec.entrypoint
        if not (spec.module or spec.no_python):
            # "train.py" and "./train.py" are one script: compare resolved paths.
            entrypoint = os.path.realpath(os.path.join(spec.cwd or ".", entrypoint))
        self.writer = Writer(run_id=spec.run_id, entrypoint=entrypoint, args=list(spec.args),
                             world_size=spec.world_size)
        #: The step the ranks being launched resume from (None: from scratch).
        self.resume_step: int | None = None
        self._pending: dict[tuple[str, int], dict[int, list[FileEntry]]] = {}
        #: (tag, step) pairs that some rank reported as sharded (DCP) state.
        self._sharded: set[tuple[str, int]] = set()
        self._send, self._receive = trio.open_memory_channel[tuple[str, int, dict]](float("inf"))
        #: Steps that every rank reported and that are not committed (or refused) yet.
        self._queued = 0
        self._progress = trio.Event()

    async def start(self, cleanup: bool = True) -> None:
        """Clean what crashed saves left and learn the newest committed step."""
        if cleanup:
            await trio.to_thread.run_sync(self.store.cleanup)
        latest = await trio.to_thread.run_sync(self.store.latest)
        self.committed_step = latest.step if latest else None

    async def plan_resume(self, attempt: int, rank: int | None = None) -> ResumePlan:
        """Choose the step that the ranks about to start resume from; emit and log it.

        Raises CheckpointRefused when the newest intact step is not this job's
        to resume (another world size or run), OSError when the store cannot be read."""
        spec = self.job.spec
        # An elastic job's attempt may have fewer ranks than its spec: the resume
        # rule (per-rank files only at their own world size) is the attempt's.
        self.writer = msgspec.structs.replace(self.writer, world_size=self.job.world_size)
        plan = await trio.to_thread.run_sync(
            lambda: choose_resume(self.store, writer=self.writer, resume_foreign=spec.resume)
        )
        self.resume_step = plan.step
        if plan.step is not None:
            self.committed_step = max(plan.step, self.committed_step or plan.step)
        who = "" if rank is None else f" rank={rank}"
        (log.warning if plan.skipped or plan.foreign else log.info)(
            "job=%s attempt=%d%s: %s", self.job.job_id, attempt, who, plan.describe())
        self.job.emit(
            ResumeChosen, attempt=attempt, rank=rank, step=plan.step, message=plan.describe(),
            skipped=[SkippedStepInfo(step=s.step, reason=s.reason) for s in plan.skipped],
        )
        return plan

    async def finish(self) -> None:
        """The job is over: nothing it staged can commit any more; remove it."""
        self._pending.clear()
        self._sharded.clear()
        await trio.to_thread.run_sync(self.store.cleanup)

    async def new_attempt(self, tag: str) -> None:
        # Steps of earlier attempts can never complete now: forget them, remove their files.
        self._pending = {key: ranks for key, ranks in self._pending.items() if key[0] == tag}
        self._sharded = {key for key in self._sharded if key[0] == tag}
        await trio.to_thread.run_sync(self.store.cleanup)

    def ready(self, tag: str, rank: int, message: protocol.CheckpointReady) -> None:
        files = [FileEntry(name=f.name, size=f.size, checksum=f.checksum, rank=rank) for f in message.files]
        ranks = self._pending.setdefault((tag, message.step), {})
        ranks[rank] = files
        if message.layout == "dcp":
            self._sharded.add((tag, message.step))
        if len(ranks) == self.job.world_size:
            del self._pending[(tag, message.step)]
            self._queued += 1
            self._send.send_nowait((tag, message.step, ranks))

    async def drain(self) -> None:
        """Wait until every step that all ranks reported is committed (or refused).

        The job's last save (``save(wait=False)`` then exit, or a graceful
        stop's checkpoint) must not be lost because the job ended first."""
        while self._queued:
            await self._progress.wait()

    def failed(self, rank: int, attempt: int, message: protocol.CheckpointFailed) -> None:
        log.warning("job=%s attempt=%d rank=%d: checkpoint step %d failed: %s",
                    self.job.job_id, attempt, rank, message.step, message.error)
        self.job.emit(CheckpointFailedEvent, attempt=attempt, rank=rank, step=message.step, error=message.error)

    async def run(self) -> None:
        async for tag, step, ranks in self._receive:
            try:
                await self._commit(tag, step, ranks)
            finally:
                self._queued -= 1
                self._progress.set()
                self._progress = trio.Event()

    async def _commit(self, tag: str, step: int, ranks: dict[int, list[FileEntry]]) -> None:
        files = [entry for rank in sorted(ranks) for entry in ranks[rank]]
        layout = "dcp" if (tag, step) in self._sharded else "rank"
        self._sharded.discard((tag, step))
        started = time.perf_counter()
        try:
            await trio.to_thread.run_sync(
                lambda: self.store.commit(step, files, tag=tag, world_size=len(ranks),
                                          writer=self.writer, layout=layout)
            )
        except CheckpointError as exc:
            log.warning("job=%s: %s", self.job.job_id, exc)
            self.job.emit(CheckpointFailedEvent, attempt=self.job.attempt, step=step, error=str(exc))
            return
        self.committed_step = max(step, self.committed_step or step)
        self.job.emit(
            CheckpointCommitted, attempt=self.job.attempt, step=step, files=len(files),
            bytes=sum(f.size for f in files), seconds=round(time.perf_counter() - started, 6),
        )
        self.job.broadcast(protocol.Committed(step=step))
        spec = self.job.spec
        if spec.keep_checkpoints:
            protect = () if self.resume_step is None else (self.resume_step,)
            try:
                await trio.to_thread.run_sync(
                    lambda: self.store.retain(spec.keep_checkpoints, keep_every=spec.keep_every, protect=protect)
                )
            except (OSError, CheckpointError) as exc:  # retention is housekeeping: never fail the job for it
                log.warning("job=%s: retention after step %d failed: %s", self.job.job_id, step, exc)
