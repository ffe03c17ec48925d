"""The coordinator's half of the multi-rank checkpoint commit.

Each rank writes its own files for step N into the attempt's staging area and
reports ``CheckpointReady``. When every rank of the job has reported step N
under the same staging tag, one task commits it (in a worker thread: fsspec
is blocking), emits ``checkpoint_committed``, and tells the ranks
``Committed(N)``. A step that some rank never reports is never committed; its
files are removed by ``cleanup`` before the next group attempt starts, when no
rank can be writing. Commits run one at a time, in the order they complete,
so LATEST only moves forward.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import trio

from rankwarden import protocol
from rankwarden.checkpoint import CheckpointStore, FileEntry
from rankwarden.errors import CheckpointError
from rankwarden.events import CheckpointCommitted, CheckpointFailedEvent

if TYPE_CHECKING:  # pragma: no cover
    from rankwarden.coordinator._job import Coordinator

__all__ = ["Committer"]

log = logging.getLogger(__name__)


class Committer:
    def __init__(self, job: "Coordinator", store: CheckpointStore) -> None:
        self.job = job
        self.store = store
        self.committed_step: int | None = None
        self._pending: dict[tuple[str, int], dict[int, list[FileEntry]]] = {}
        self._send, self._receive = trio.open_memory_channel[tuple[str, int, dict]](float("inf"))

    async def start(self, cleanup: bool = True) -> None:
        """Clean what crashed saves left and learn the newest committed step."""
        if cleanup:
            await trio.to_thread.run_sync(self.store.cleanup)
        latest = await trio.to_thread.run_sync(self.store.latest)
        self.committed_step = latest.step if latest else None

    async def new_attempt(self, tag: str) -> None:
        # Steps of earlier attempts can never complete now: forget them, remove their files.
        self._pending = {key: ranks for key, ranks in self._pending.items() if key[0] == tag}
        await trio.to_thread.run_sync(self.store.cleanup)

    def ready(self, tag: str, rank: int, message: protocol.CheckpointReady) -> None:
        files = [FileEntry(name=f.name, size=f.size, checksum=f.checksum, rank=rank) for f in message.files]
        ranks = self._pending.setdefault((tag, message.step), {})
        ranks[rank] = files
        if len(ranks) == self.job.spec.world_size:
            del self._pending[(tag, message.step)]
            self._send.send_nowait((tag, message.step, ranks))

    def failed(self, rank: int, attempt: int, message: protocol.CheckpointFailed) -> None:
        log.warning("job=%s attempt=%d rank=%d: checkpoint step %d failed: %s",
                    self.job.job_id, attempt, rank, message.step, message.error)
        self.job.emit(CheckpointFailedEvent, attempt=attempt, rank=rank, step=message.step, error=message.error)

    async def run(self) -> None:
        async for tag, step, ranks in self._receive:
            files = [entry for rank in sorted(ranks) for entry in ranks[rank]]
            started = time.perf_counter()
            try:
                await trio.to_thread.run_sync(
                    lambda: self.store.commit(step, files, tag=tag, world_size=self.job.spec.world_size)
                )
            except CheckpointError as exc:
                log.warning("job=%s: %s", self.job.job_id, exc)
                self.job.emit(CheckpointFailedEvent, attempt=self.job.attempt, step=step, error=str(exc))
                continue
            self.committed_step = max(step, self.committed_step or step)
            self.job.emit(
                CheckpointCommitted, attempt=self.job.attempt, step=step, files=len(files),
                bytes=sum(f.size for f in files), seconds=round(time.perf_counter() - started, 6),
            )
            self.job.broadcast(protocol.Committed(step=step))
            spec = self.job.spec
            if spec.keep_checkpoints:
                await trio.to_thread.run_sync(
                    lambda: self.store.retain(spec.keep_checkpoints, keep_every=spec.keep_every)
                )
