"""A rank's side of the multi-rank commit: write my file, report it, wait for the commit.

Used inside a training script (synchronous). Everything comes from the
environment the coordinator gives ranks (``RANKWARDEN_CHECKPOINT_URL``,
``RANKWARDEN_JOB_ID``, ``RANK``, ``WORLD_SIZE``, ``RANKWARDEN_CHECKPOINT_TAG``);
without a coordinator a single-rank job commits its own steps.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

from rankwarden import protocol
from rankwarden.checkpoint._backends import Payload
from rankwarden.checkpoint._manifest import FileEntry
from rankwarden.checkpoint._store import CheckpointStore, rank_file_name
from rankwarden.checkpoint._torch import load_torch, torch_payload
from rankwarden.errors import CheckpointError

__all__ = ["RankCheckpointer"]

log = logging.getLogger(__name__)


class RankCheckpointer:
    def __init__(
        self,
        url: str | None = None,
        *,
        job: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        tag: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        env = os.environ
        url = url or env.get("RANKWARDEN_CHECKPOINT_URL")
        if not url:
            raise CheckpointError("no checkpoint URL: pass one or run under rankwarden with --checkpoint URL")
        self.rank = int(env.get("RANK", "0")) if rank is None else rank
        self.world_size = int(env.get("WORLD_SIZE", "1")) if world_size is None else world_size
        self.tag = tag or env.get("RANKWARDEN_CHECKPOINT_TAG") or "local"
        self.store = CheckpointStore(url, job or env.get("RANKWARDEN_JOB_ID") or "default", storage_options=storage_options)
        import rankwarden.worker as worker

        self._client = worker.connect()

    @property
    def file_name(self) -> str:
        return rank_file_name(self.rank)

    def save(self, step: int, payload: Payload) -> FileEntry:
        """Write this rank's payload for ``step`` durably and report it for commit."""
        try:
            entry = self.store.write_file(step, self.file_name, payload, tag=self.tag, rank=self.rank)
        except CheckpointError as exc:
            if self._client is not None:
                self._client.send(protocol.CheckpointFailed(step=step, error=str(exc)))
            raise
        if self._client is not None:
            info = protocol.FileInfo(name=entry.name, size=entry.size, checksum=entry.checksum)
            self._client.send(protocol.CheckpointReady(step=step, files=[info]))
        elif self.world_size == 1:
            self.store.commit(step, [entry], tag=self.tag, world_size=1)
        else:
            self._commit_without_coordinator(step, entry)
        return entry

    def _commit_without_coordinator(self, step: int, entry: FileEntry) -> None:
        # Plain torchrun: the ranks commit among themselves. Everyone's entry
        # goes to rank 0, which commits; the barrier keeps anyone from running
        # ahead of a step that is not committed yet.
        try:
            import torch.distributed as dist
        except ImportError:
            dist = None
        if dist is None or not dist.is_initialized():
            raise CheckpointError(
                "a multi-rank checkpoint needs a committer: run under rankwarden, or initialise torch.distributed"
            )
        entries: list = [None] * self.world_size
        dist.all_gather_object(entries, entry)
        if self.rank == 0:
            self.store.commit(step, entries, tag=self.tag, world_size=self.world_size)
        dist.barrier()

    def save_state(self, step: int, state: Any) -> FileEntry:
        return self.save(step, torch_payload(state))

    def wait_committed(self, step: int, timeout: float | None = None) -> bool:
        """Block until ``step`` is committed; True at once without a coordinator (save committed it)."""
        if self._client is None:
            return True
        return self._client.wait_committed(step, timeout)

    def load_latest(self) -> tuple[int, bytes] | None:
        """This rank's payload from the newest committed step that verifies, or None."""
        found = self.store.load_latest([self.file_name])
        if found is None:
            return None
        manifest, files = found
        return manifest.step, files[self.file_name]

    def load_latest_state(self, *, map_location: Any = "cpu") -> tuple[int, Any] | None:
        found = self.load_latest()
        if found is None:
            return None
        step, data = found
        return step, load_torch(data, map_location=map_location)
