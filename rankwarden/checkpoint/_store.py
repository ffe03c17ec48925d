"""The checkpoint store: atomic commit, verified resume, garbage collection, retention.

    <url>/<job>/step_000001230/rank_00000.pt ...   payloads
    <url>/<job>/step_000001230/manifest.json       the commit (see _manifest)
    <url>/<job>/LATEST                             names the newest committed step: a hint

Resume never trusts LATEST alone. It lists the committed steps newest first
and takes the first whose manifest parses and whose files are all present
with the listed sizes (checksums are verified when a file is read). LATEST
naming something else (garbage, a step that vanished, an older step after a
crash between commit and LATEST) is logged and ignored. LATEST itself only
ever moves forward.

Everything here is blocking I/O: the coordinator calls it through
``trio.to_thread``; a training script calls it directly (or through
``AsyncCheckpointer``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from typing import Any, Iterable, Iterator, Mapping

from rankwarden.checkpoint._backends import (
    MANIFEST,
    LocalBackend,
    ObjectBackend,
    Payload,
    algorithm_of,
)
from rankwarden.checkpoint._faults import fault_point
from rankwarden.checkpoint._manifest import FileEntry, Manifest, parse_step_dir
from rankwarden.errors import CheckpointError, CorruptCheckpoint

__all__ = ["CheckpointStore", "rank_file_name"]

log = logging.getLogger(__name__)


def rank_file_name(rank: int, suffix: str = ".pt") -> str:
    return f"rank_{rank:05d}{suffix}"


def _open_backend(url: str, job: str, storage_options: Mapping[str, Any] | None):
    if "://" not in url or url.startswith("file://"):
        path = url[len("file://"):] if url.startswith("file://") else url
        return LocalBackend(os.path.join(path, job))
    import fsspec  # only object stores need it

    fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        return LocalBackend(os.path.join(root, job))
    return ObjectBackend(fs, f"{root.rstrip('/')}/{job}")


class CheckpointStore:
    """Checkpoints of one job under an fsspec URL (a plain path, ``file://``, ``s3://``, ``memory://``)."""

    def __init__(self, url: str, job: str, *, storage_options: Mapping[str, Any] | None = None) -> None:
        if not job or "/" in job or job in (".", ".."):
            raise CheckpointError(f"invalid job name for a checkpoint store: {job!r}")
        self.url = url
        self.job = job
        self.backend = _open_backend(url, job, storage_options)
        self._reading: dict[int, int] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CheckpointStore({self.url!r}, job={self.job!r})"

    # -- writing ---------------------------------------------------------------------

    def staging_dir(self, step: int, tag: str) -> str:
        """Where the payloads of an uncommitted ``step`` go; every rank of one attempt shares ``tag``."""
        return self.backend.staging_dir(step, tag)

    def write_file(self, step: int, name: str, payload: Payload, *, tag: str, rank: int | None = None) -> FileEntry:
        """Write one payload of ``step`` durably into the ``tag`` staging area; returns its size and checksum."""
        if not name or "/" in name or name in (".", "..", MANIFEST):
            raise CheckpointError(f"invalid checkpoint file name {name!r}")
        if not self.backend.atomic_rename:
            self._claim_object_step(step)
        try:
            return self.backend.write_payload(self.staging_dir(step, tag), name, payload, rank)
        except OSError as exc:
            raise CheckpointError(f"{self.job}: writing {name} of step {step} failed: {exc}") from exc

    def _claim_object_step(self, step: int) -> None:
        # On an object store payloads go to their final keys: never overwrite
        # the files of a committed step. A committed step that fails
        # verification is decommitted (its manifest removed) so a good save can
        # replace it; a step without a manifest is in progress: write along.
        path = self.backend.step_dirs().get(step)
        if path is None or self.backend.size(f"{path}/{MANIFEST}") is None:
            return
        try:
            self._verify(step, path, checksums=True)
        except CorruptCheckpoint as exc:
            log.warning("job=%s: step %d is committed but damaged (%s); replacing it", self.job, step, exc)
            self.backend.remove(f"{path}/{MANIFEST}")
            return
        raise CheckpointError(f"{self.job}: step {step} is already committed; refusing to overwrite its files")

    def commit(
        self,
        step: int,
        files: Iterable[FileEntry],
        *,
        tag: str,
        world_size: int = 1,
        metadata: Mapping[str, Any] | None = None,
    ) -> Manifest:
        """Commit ``step`` from the ``tag`` staging area: check the files, write the manifest, move LATEST.

        The files must be there with the sizes given; anything else is refused,
        so a rank's claim is never committed on trust."""
        staging = self.staging_dir(step, tag)
        manifest = Manifest(job=self.job, step=step, world_size=world_size, files=list(files), metadata=dict(metadata or {}))
        for entry in manifest.files:
            size = self.backend.size(f"{staging.rstrip('/')}/{entry.name}")
            if size != entry.size:
                raise CheckpointError(
                    f"{self.job}: cannot commit step {step}: {entry.name} is "
                    f"{'missing' if size is None else f'{size} bytes'}, expected {entry.size}"
                )
        try:
            fault_point("after_payloads")
            if self.backend.atomic_rename:
                self._replace_if_damaged(step)
            fresh = self.backend.commit(staging, step, manifest.encode())
            if not fresh:
                log.warning("job=%s: step %d was already committed; kept the existing one", self.job, step)
                return self._verify(step, self.backend.step_dirs()[step])
            self._move_latest(step)
        except OSError as exc:
            raise CheckpointError(f"{self.job}: committing step {step} failed: {exc}") from exc
        return manifest

    def _replace_if_damaged(self, step: int) -> None:
        path = self.backend.step_dirs().get(step)
        if path is None:
            return
        try:
            self._verify(step, path, checksums=True)
        except CorruptCheckpoint as exc:
            log.warning("job=%s: step %d is committed but damaged (%s); replacing it", self.job, step, exc)
            self.backend.remove_step(path)

    def save(
        self,
        step: int,
        payloads: Mapping[str, Payload],
        *,
        world_size: int = 1,
        metadata: Mapping[str, Any] | None = None,
    ) -> Manifest:
        """Write and commit a whole step from this one process (no coordinator)."""
        tag = uuid.uuid4().hex[:12]
        try:
            entries = [self.write_file(step, name, payload, tag=tag) for name, payload in payloads.items()]
            return self.commit(step, entries, tag=tag, world_size=world_size, metadata=metadata)
        except BaseException:
            # A failed save leaves no trace that a reader could mistake for a step.
            with contextlib.suppress(OSError):
                if self.backend.atomic_rename:
                    self.backend.remove(self.staging_dir(step, tag))
            raise

    def _move_latest(self, step: int) -> None:
        current = self._latest_hint()
        if current is not None and current >= step:
            return  # LATEST only moves forward
        self.backend.write_latest(step)
        fault_point("after_latest")

    # -- reading ---------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Step numbers that have a step directory, newest first (committed or not yet verified)."""
        return sorted(self.backend.step_dirs(), reverse=True)

    def _latest_hint(self) -> int | None:
        raw = self.backend.read_latest()
        if raw is None:
            return None
        step = parse_step_dir(raw.decode(errors="replace").strip())
        if step is None:
            log.warning("job=%s: LATEST holds %r, not a step name; ignoring it", self.job, raw[:64])
        return step

    def _verify(self, step: int, path: str, *, checksums: bool = False) -> Manifest:
        where = f"{self.job} step {step}"
        try:
            raw = self.backend.read(f"{path}/{MANIFEST}")
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{where}: no manifest (the save never committed)") from None
        manifest = Manifest.decode(raw, where=where)
        if manifest.step != step or manifest.job != self.job:
            raise CorruptCheckpoint(f"{where}: manifest is for job {manifest.job!r} step {manifest.step}")
        for entry in manifest.files:
            size = self.backend.size(f"{path}/{entry.name}")
            if size is None:
                raise CorruptCheckpoint(f"{where}: {entry.name} is missing")
            if size != entry.size:
                raise CorruptCheckpoint(f"{where}: {entry.name} is {size} bytes, manifest says {entry.size}")
            if checksums and self.backend.checksum(f"{path}/{entry.name}", algorithm_of(entry.checksum)) != entry.checksum:
                raise CorruptCheckpoint(f"{where}: {entry.name} does not match its checksum")
        return manifest

    def manifests(self, *, checksums: bool = False) -> Iterator[Manifest]:
        """Committed steps that verify, newest first; each skipped one is logged with the reason."""
        dirs = self.backend.step_dirs()
        hint = self._latest_hint()
        if dirs and hint is not None:
            newest = max(dirs)
            if hint not in dirs:
                log.warning("job=%s: LATEST names step %d, which does not exist; ignoring it", self.job, hint)
            elif hint < newest:
                log.warning("job=%s: LATEST names step %d but step %d is newer; checking the newer first",
                            self.job, hint, newest)
        for step in sorted(dirs, reverse=True):
            try:
                yield self._verify(step, dirs[step], checksums=checksums)
            except CorruptCheckpoint as exc:
                log.warning("job=%s: skipping step %d: %s", self.job, step, exc)

    def latest(self, *, checksums: bool = False) -> Manifest | None:
        """The newest committed step that verifies, or None (an empty or missing root is not an error)."""
        return next(self.manifests(checksums=checksums), None)

    def read(self, manifest: Manifest, name: str) -> bytearray:
        """One file of a committed step, checked against the manifest's size and checksum.

        The bytes are read into one new buffer (a bytearray: ``load_torch``
        makes the tensors views of it, no copy) while a second thread
        checksums them; nothing is returned before the checksum matches."""
        entry = manifest.file(name)
        path = f"{self.backend.step_dirs().get(manifest.step, '')}/{name}"
        try:
            data, checksum, exact = self.backend.read_checksummed(path, entry.size, algorithm_of(entry.checksum))
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{self.job} step {manifest.step}: {name} is missing") from None
        if not exact or checksum != entry.checksum:
            raise CorruptCheckpoint(f"{self.job} step {manifest.step}: {name} does not match its checksum")
        return data

    def load_latest(self, names: Iterable[str] | None = None) -> tuple[Manifest, dict[str, bytearray]] | None:
        """The newest step whose requested files (default: all) all read back intact, with their bytes."""
        wanted = None if names is None else list(names)
        for manifest in self.manifests():
            with self.reading(manifest.step):
                try:
                    files = wanted if wanted is not None else [f.name for f in manifest.files]
                    return manifest, {name: self.read(manifest, name) for name in files}
                except (CorruptCheckpoint, KeyError) as exc:
                    log.warning("job=%s: skipping step %d: %s", self.job, manifest.step, exc)
        return None

    @contextlib.contextmanager
    def reading(self, step: int) -> Iterator[None]:
        """While inside, retention in this process will not delete ``step``."""
        with self._lock:
            self._reading[step] = self._reading.get(step, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._reading[step] -= 1
                if not self._reading[step]:
                    del self._reading[step]

    # -- housekeeping ------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Remove what failed saves left behind. Call only while no save is being written."""
        removed = []
        for path in self.backend.garbage():
            log.info("job=%s: removing uncommitted checkpoint data %s", self.job, path)
            self.backend.remove(path)
            removed.append(path)
        return removed

    def retain(self, keep_last: int, *, keep_every: int = 0, protect: Iterable[int] = ()) -> list[int]:
        """Delete committed steps beyond the newest ``keep_last`` (and every ``keep_every``-th).

        Never deletes the step LATEST names, the newest step that verifies
        (so a damaged newer step cannot cost the last good one), a step in
        ``protect``, or one being read in this process. Returns the deleted steps."""
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        dirs = self.backend.step_dirs()
        keep = set(sorted(dirs, reverse=True)[:keep_last]) | set(protect)
        hint = self._latest_hint()
        if hint is not None:
            keep.add(hint)
        good = self.latest()
        if good is not None:
            keep.add(good.step)
        with self._lock:
            keep |= set(self._reading)
        deleted = []
        for step in sorted(dirs):
            if step in keep or (keep_every and step % keep_every == 0):
                continue
            self.backend.remove_step(dirs[step])
            deleted.append(step)
        if deleted:
            log.info("job=%s: retention deleted steps %s", self.job, deleted)
        return deleted
