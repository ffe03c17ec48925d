"""A rank's side of the multi-rank commit: write my file, report it, wait for the commit.

Used inside a training script (synchronous). Everything comes from the
environment the coordinator gives ranks (``RANKWARDEN_CHECKPOINT_URL``,
``RANKWARDEN_JOB_ID``, ``RANK``, ``WORLD_SIZE``, ``RANKWARDEN_CHECKPOINT_TAG``);
without a coordinator a single-rank job commits its own steps.

Which step to load is never this rank's choice when it has peers:

- under rankwarden the coordinator names the step in its ``Welcome`` (the
  same for every rank of the attempt, verified by checksum beforehand);
- under plain torchrun rank 0 chooses and broadcasts it through
  ``torch.distributed``;
- a single process chooses for itself.

If the named step cannot be read, ``load`` raises: the rank fails, and the
coordinator chooses again (verifying every file) before the next attempt.
Falling back on its own would put this rank on another step than its peers.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Mapping

from rankwarden import protocol
from rankwarden.checkpoint import CheckpointStore, FileEntry, Writer, choose_resume, rank_file_name
from rankwarden.checkpoint._backends import Payload
from rankwarden.checkpoint._dcp import Resharded, load_sharded, save_sharded
from rankwarden.checkpoint._torch import load_torch, torch_payload
from rankwarden.errors import CheckpointError, CorruptCheckpoint

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
        import rankwarden.worker as worker

        self._client = worker.connect()
        managed_url = env.get("RANKWARDEN_CHECKPOINT_URL")
        if self._client is not None and url and url != managed_url:
            # The coordinator commits into its own store only: files written
            # elsewhere would be reported and never committed.
            where = f"whose checkpoint store is {managed_url!r}" if managed_url else "and this job has no checkpoint store"
            raise CheckpointError(
                f"this rank runs under rankwarden {where}, but was given url={url!r}: the coordinator commits "
                "only into its own store. Pass the location to it (`rankwarden run --checkpoint URL`, "
                "JobSpec.checkpoint_url) and call save/restore without url"
            )
        url = url or managed_url
        if not url:
            raise CheckpointError(
                "no checkpoint URL: without rankwarden pass url= (a directory path works); under rankwarden the job "
                "has no checkpoint store (`rankwarden run` gives one by default; JobSpec.checkpoint_url)")
        self.rank = int(env.get("RANK", "0")) if rank is None else rank
        self.world_size = int(env.get("WORLD_SIZE", "1")) if world_size is None else world_size
        self.tag = tag or env.get("RANKWARDEN_CHECKPOINT_TAG") or "local"
        self.store = CheckpointStore(url, job or env.get("RANKWARDEN_JOB_ID") or "default", storage_options=storage_options)

    @property
    def file_name(self) -> str:
        return rank_file_name(self.rank)

    def _writer(self) -> Writer:
        # Without a coordinator the script's own command line is the fingerprint.
        entrypoint = os.path.realpath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
        return Writer(entrypoint=entrypoint, args=list(sys.argv[1:]), world_size=self.world_size)

    def save(self, step: int, payload: Payload) -> FileEntry:
        """Write this rank's payload for ``step`` durably and report it for commit."""
        try:
            entry = self.store.write_file(step, self.file_name, payload, tag=self.tag, rank=self.rank)
        except CheckpointError as exc:
            self._failed(step, exc)
            raise
        self._report(step, [entry], "rank")
        return entry

    def save_sharded(self, step: int, state: dict, per_rank: Any = None, *, process_group: Any = None) -> list[FileEntry]:
        """Save ``state`` through DCP (collective: every rank calls it) and ``per_rank`` as this rank's own file.

        ``state`` is the job's state as DCP sees it: DTensor shards are
        written by their owners, a tensor or value that every rank holds (a
        DDP replica, the step number) once. ``per_rank`` (RNG, data position)
        is this rank's alone, in rankwarden's tensor format. Reported for
        commit like ``save``; the step's manifest says ``layout: "dcp"``."""
        try:
            entries = save_sharded(self.store, step, state, tag=self.tag, rank=self.rank, process_group=process_group)
            if per_rank is not None:
                entries.append(self.store.write_file(step, self.file_name, torch_payload(per_rank),
                                                     tag=self.tag, rank=self.rank))
        except CheckpointError as exc:
            self._failed(step, exc)
            raise
        except Exception as exc:  # DCP's own errors (CheckpointException) name the failing rank
            self._failed(step, exc)
            raise CheckpointError(f"rank {self.rank}: sharded save of step {step} failed: {exc}") from exc
        self._report(step, entries, "dcp")
        return entries

    def async_sharded(self, *, on_error: Any = None):
        """An ``AsyncCheckpointer`` for sharded saves: ``.save(step, {"state": ..., "per_rank": ...})``.

        The training thread copies the state (DTensor shards included) into
        reused CPU buffers; a background thread runs DCP's save over a
        process group of its own (created here, collectively: every rank
        calls this at the same point), so its collectives never interleave
        with training's. The state must hold state dicts, not modules (take
        them with ``get_state_dict``). At most one save in flight, and the
        policy is ``wait``: a rank that skipped a save while another did not
        would leave the other waiting in DCP's collectives forever."""
        from rankwarden.checkpoint._async import AsyncCheckpointer

        group = None
        dist = self._dist()
        if dist is not None and self.world_size > 1:
            group = dist.new_group(backend="gloo")  # DCP's own async_save does the same

        def write(step: int, snapshot: dict) -> list[FileEntry]:
            return self.save_sharded(step, snapshot["state"], snapshot.get("per_rank"), process_group=group)

        return AsyncCheckpointer(write, policy="wait", on_error=on_error)

    def _failed(self, step: int, exc: BaseException) -> None:
        if self._client is not None:
            self._client.send(protocol.CheckpointFailed(step=step, error=str(exc)))

    def _report(self, step: int, entries: list[FileEntry], layout: str) -> None:
        if self._client is not None:
            infos = [protocol.FileInfo(name=e.name, size=e.size, checksum=e.checksum) for e in entries]
            self._client.send(protocol.CheckpointReady(step=step, files=infos, layout=layout))
        elif self.world_size == 1:
            self.store.commit(step, entries, tag=self.tag, world_size=1, writer=self._writer(), layout=layout)
        else:
            self._commit_without_coordinator(step, entries, layout)

    def _dist(self):
        try:
            import torch.distributed as dist
        except ImportError:
            return None
        return dist if dist.is_available() and dist.is_initialized() else None

    def _commit_without_coordinator(self, step: int, mine: list[FileEntry], layout: str) -> None:
        # Plain torchrun: the ranks commit among themselves. Everyone's entry
        # goes to rank 0, which commits; the barrier keeps anyone from running
        # ahead of a step that is not committed yet.
        dist = self._dist()
        if dist is None:
            raise CheckpointError(
                "a multi-rank checkpoint needs a committer: run under rankwarden, or initialise torch.distributed"
            )
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        entries = [entry for rank_entries in gathered for entry in rank_entries]
        outcome: list = [None]
        if self.rank == 0:
            try:
                self.store.commit(step, entries, tag=self.tag, world_size=self.world_size, writer=self._writer(),
                                  layout=layout)
            except CheckpointError as exc:  # every rank must hear of it, or they wait in the broadcast forever
                outcome = [f"{type(exc).__name__}: {exc}"]
        # A broadcast rather than a barrier: it also carries rank 0's verdict.
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise CheckpointError(f"step {step} was not committed: {outcome[0]}")

    def save_state(self, step: int, state: Any) -> FileEntry:
        return self.save(step, torch_payload(state))

    def wait_committed(self, step: int, timeout: float | None = None) -> bool:
        """Block until ``step`` is committed; True at once without a coordinator (save committed it)."""
        if self._client is None:
            return True
        return self._client.wait_committed(step, timeout)

    # -- loading ---------------------------------------------------------------------

    def resume_step(self) -> int | None:
        """The step every rank of this job loads (None: start from scratch); see the module docstring."""
        if self._client is not None:
            welcome = self._client.welcome
            if welcome is None or welcome.resume is None:
                raise CheckpointError(
                    "the coordinator did not name a resume step for this rank (it has no checkpoint store, "
                    "or speaks an older protocol); refusing to choose one alone"
                )
            return welcome.resume.step
        if self.world_size == 1:
            return choose_resume(self.store, writer=None).step
        dist = self._dist()
        if dist is None:
            raise CheckpointError(
                f"rank {self.rank} of {self.world_size}: restoring needs one step agreed by every rank; run under "
                "rankwarden, or initialise torch.distributed before restore so that rank 0 can choose it"
            )
        choice: list = [None]
        if self.rank == 0:
            plan = choose_resume(self.store, writer=None)
            if plan.step is not None:
                manifest = self.store.verify(plan.step, checksums=False)
                if manifest.world_size != self.world_size and manifest.layout != "dcp":
                    choice = [CheckpointError(
                        f"step {plan.step} was written by {manifest.world_size} rank(s), this job has "
                        f"{self.world_size}; its state is one file per rank (not sharded through DCP), "
                        "which cannot be resharded")]
                else:
                    choice = [plan.step]
            log.info("rank 0 chose the resume step for all ranks: %s", plan.describe())
        dist.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], Exception):
            raise choice[0]
        return choice[0]

    def load_latest(self) -> tuple[int, bytes] | None:
        """This rank's payload of the agreed resume step, or None to start from scratch.

        Raises CheckpointError if that step cannot be read: never another step."""
        step = self.resume_step()
        if step is None:
            return None
        with self.store.reading(step):
            try:
                manifest = self.store.manifest(step)  # this rank's file is checked (size, checksum) as it is read
                if manifest.layout == "dcp":
                    raise CheckpointError(
                        f"step {step} holds sharded (DCP) state: restore it with `into=` the state to load into")
                if manifest.world_size != self.world_size:
                    raise CheckpointError(
                        f"step {step} was written by {manifest.world_size} rank(s), this job has {self.world_size}")
                return step, self.store.read(manifest, self.file_name)
            except (CorruptCheckpoint, KeyError) as exc:
                raise self._cannot_load(step, exc) from exc

    def _cannot_load(self, step: int, exc: Exception) -> CheckpointError:
        return CheckpointError(
            f"rank {self.rank} cannot load step {step}, the step every rank of this attempt resumes "
            f"from: {exc}. Not falling back alone (ranks on different steps diverge silently); "
            "the coordinator chooses again before the next attempt"
        )

    def load_latest_state(self, *, map_location: Any = "cpu") -> tuple[int, Any] | None:
        found = self.load_latest()
        if found is None:
            return None
        step, data = found
        return step, load_torch(data, map_location=map_location)

    def load_sharded_latest(self, state: dict, *, map_location: Any = "cpu",
                            process_group: Any = None) -> tuple[int, Any] | None:
        """Load the agreed resume step's sharded state into ``state`` in place (collective); None: start fresh.

        Returns (step, per_rank): this rank's per-rank state when the step was
        written by this world size (None if it saved none), or a ``Resharded``
        holding every writer rank's per-rank state when it was written by
        another (DCP has resharded ``state``; redistribute the data positions
        with ``ShardedRecords.load_state_dict(list)``). Raises CheckpointError
        if that step cannot be read: never another step."""
        step = self.resume_step()
        if step is None:
            return None
        with self.store.reading(step):
            try:
                manifest = self.store.manifest(step)  # each file is checked as it is read
                load_sharded(self.store, manifest, state, process_group=process_group)
                names = {f.name for f in manifest.files}

                def per_rank_of(rank: int) -> Any:
                    name = rank_file_name(rank)
                    return load_torch(self.store.read(manifest, name), map_location=map_location) if name in names else None

                if manifest.world_size == self.world_size:
                    return step, per_rank_of(self.rank)
                return step, Resharded(world_size=manifest.world_size,
                                       ranks=[per_rank_of(r) for r in range(manifest.world_size)])
            except (CorruptCheckpoint, KeyError) as exc:
                raise self._cannot_load(step, exc) from exc
