"""Choosing the one step that every rank of a job resumes from.

Resume is decided once, by one process (the coordinator, or rank 0 of a job
that runs without one), and handed to every rank; a rank never falls back on
its own. Two ranks that each pick "the newest step I can read" diverge the
moment one rank's file of that step is damaged: DDP then averages gradients
across different models and the job still ends "succeeded".

The rule, newest committed step first:

1. A step that does not verify (manifest missing or unparsable, a file
   missing, a size or a **checksum** wrong) is skipped, and the reason is kept
   so the event log can say "step 12 skipped: rank 1's file ... failed its
   checksum".
2. The first step that verifies is the candidate. If it was written by
   another world size, it is resumed only if its state is sharded through DCP
   (``layout: "dcp"``: DCP reshards it on load, and the data positions are
   redistributed, see ``rankwarden.data``); a step of per-rank files is
   **refused**, naming both sizes: falling back to an older step, or to
   step 0, would silently discard training.
3. If its writer's fingerprint (run, entrypoint, arguments) differs from this
   job's, it is refused unless the job asked to resume foreign checkpoints
   (``JobSpec.resume``); a manifest without a fingerprint counts as foreign.

Checksums of every file are read here, on top of the check each rank makes
when it loads its own file: slower, never wrong.
"""

from __future__ import annotations

import logging

import msgspec

from rankwarden.checkpoint._manifest import Manifest, Writer
from rankwarden.checkpoint._store import CheckpointStore
from rankwarden.errors import CheckpointRefused, CorruptCheckpoint

__all__ = ["ResumePlan", "SkippedStep", "choose_resume"]

log = logging.getLogger(__name__)


class SkippedStep(msgspec.Struct, frozen=True):
    step: int
    reason: str


class ResumePlan(msgspec.Struct, frozen=True, kw_only=True):
    """The step every rank loads (None: start from scratch) and why newer ones were passed over."""

    step: int | None
    skipped: list[SkippedStep] = []
    #: Set when a foreign checkpoint is resumed because the job asked for it.
    foreign: list[str] = []
    #: The writer's world size when it differs from this job's (a sharded step, resharded on load).
    resharded_from: int | None = None

    def describe(self) -> str:
        """One line for the console and the log."""
        head = "starting from scratch: no committed checkpoint" if self.step is None else f"resuming from step {self.step}"
        notes = [f"step {s.step} skipped: {s.reason}" for s in self.skipped]
        if self.resharded_from is not None:
            notes.append(f"written by {self.resharded_from} rank(s), resharded on load")
        if self.foreign:
            notes.append("written by another run, resumed as asked: " + "; ".join(self.foreign))
        return head + (f" ({'; '.join(notes)})" if notes else "")


def _reason(exc: CorruptCheckpoint, step: int, job: str) -> str:
    # The store's messages start with "<job> step <n>: "; the plan names the step itself.
    text = str(exc)
    prefix = f"{job} step {step}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def choose_resume(store: CheckpointStore, *, writer: Writer | None, resume_foreign: bool = False) -> ResumePlan:
    """The step to resume ``store`` from for a job described by ``writer``.

    ``writer=None`` checks nothing but integrity (a store used on its own).
    Raises CheckpointRefused when the newest intact step is not this job's
    (see the module docstring); OSError when the store cannot be read."""
    skipped: list[SkippedStep] = []
    for step in store.steps():
        try:
            manifest = store.verify(step, checksums=True)
        except CorruptCheckpoint as exc:
            skipped.append(SkippedStep(step, _reason(exc, step, store.job)))
            log.warning("job=%s: step %d skipped for resume: %s", store.job, step, exc)
            continue
        foreign = _check_writer(store, manifest, writer, resume_foreign)
        resharded = None if writer is None or manifest.world_size == writer.world_size else manifest.world_size
        return ResumePlan(step=step, skipped=skipped, foreign=foreign, resharded_from=resharded)
    return ResumePlan(step=None, skipped=skipped)


def _check_writer(store: CheckpointStore, manifest: Manifest, writer: Writer | None, resume_foreign: bool) -> list[str]:
    where = f"checkpoint {store.url!r} of job {store.job!r}: step {manifest.step}"
    if writer is None:
        return []
    if manifest.world_size != writer.world_size and manifest.layout != "dcp":
        raise CheckpointRefused(
            f"{where} was written by {manifest.world_size} rank(s), this job has {writer.world_size}; "
            f"its state is one opaque file per rank (layout {manifest.layout!r}), which cannot be resharded: "
            f"only state saved sharded through torch.distributed.checkpoint (DTensor/FSDP2/DDP modules, "
            f"layout 'dcp') resumes at another world size, so an elastic job (--nnodes MIN:MAX), whose world "
            f"size changes when nodes are lost or join, must save sharded state. Run with world size "
            f"{manifest.world_size}, or start fresh with another checkpoint location or job id"
        )
    if manifest.world_size != writer.world_size:
        log.info("%s was written by %d rank(s); resharding it for %d", where, manifest.world_size, writer.world_size)
    if manifest.writer is None:
        differences = ["no fingerprint (written by an older rankwarden or by hand)"]
    else:
        # A sharded step's world size is no part of its identity: DCP reshards it.
        differences = writer.differences(msgspec.structs.replace(manifest.writer, world_size=writer.world_size))
    if not differences:
        return []
    if resume_foreign:
        log.warning("%s was written by another run (%s); resuming it as asked", where, "; ".join(differences))
        return differences
    raise CheckpointRefused(
        f"{where} was written by another run: {'; '.join(differences)}. "
        "To continue from it, ask for it (`rankwarden run --resume`, or \"resume\": true in the job spec); "
        "to start fresh, use another checkpoint location or job id"
    )
