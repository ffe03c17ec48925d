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

Retention keeps the last K steps in commit order (each manifest carries a
commit sequence), never deletes the newest step that verifies by checksum,
and never one that any process holds a reading lease on:
``<url>/<job>/leases/step_N.<id>``, a small file with an expiry that its
reader renews, removed when the read ends; leases past their expiry are
ignored and removed. ``cleanup`` removes every kind of garbage a crash can
leave, sparing the staging areas of attempts still writing (``keep_tags``).

Everything here is blocking I/O: the coordinator calls it through
``trio.to_thread``; a training script calls it directly (or through
``AsyncCheckpointer``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from typing import Any, Collection, Iterable, Iterator, Mapping

import msgspec

from rankwarden.checkpoint._backends import MANIFEST, LocalBackend, Payload, sweep_scratch
from rankwarden.checkpoint._checksum import algorithm_of
from rankwarden.checkpoint._object import ObjectBackend
from rankwarden.checkpoint._faults import fault_point
from rankwarden.checkpoint._manifest import LAYOUTS, FileEntry, Manifest, Writer, parse_step_dir, step_dir_name
from rankwarden.errors import CheckpointError, CorruptCheckpoint, StepAlreadyCommitted

__all__ = ["CheckpointStore", "rank_file_name"]

log = logging.getLogger(__name__)


_LEASE = re.compile(r"^step_(\d{9,})\.[0-9a-f]{8,}$")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def rank_file_name(rank: int, suffix: str = ".pt") -> str:
    return f"rank_{rank:05d}{suffix}"


def _commit_order(manifest: Manifest | None) -> tuple:
    # Commit sequence first; manifests from before sequences (0) by their
    # commit time; an unreadable manifest is the oldest of all.
    if manifest is None:
        return (-1, 0.0, 0)
    return (manifest.commit_seq, manifest.created_at, manifest.step)


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

    def __init__(
        self,
        url: str,
        job: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        lease_ttl: float = 300.0,
    ) -> None:
        if not job or "/" in job or job in (".", ".."):
            raise CheckpointError(f"invalid job name for a checkpoint store: {job!r}")
        if lease_ttl <= 0:
            raise ValueError(f"lease_ttl must be positive, got {lease_ttl}")
        self.url = url
        self.job = job
        self.lease_ttl = lease_ttl
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
        if not _TAG.match(tag) or tag == MANIFEST:
            raise CheckpointError(f"invalid checkpoint staging tag {tag!r}")
        if not self.backend.atomic_rename:
            self._claim_object_step(step)
        try:
            return self.backend.write_payload(self.staging_dir(step, tag), name, payload, rank)
        except OSError as exc:
            raise CheckpointError(f"{self.job}: writing {name} of step {step} failed: {exc}") from exc

    def _claim_object_step(self, step: int) -> None:
        # Refuse early to write a step that is already committed (the commit
        # would lose anyway). A committed step that fails verification is
        # decommitted (its manifest removed) so a good save can replace it;
        # its files are then garbage. The manifest is read again just before
        # the removal: one that changed meanwhile is another writer's, kept.
        path = self.backend.step_dirs().get(step)
        if path is None or self.backend.size(f"{path}/{MANIFEST}") is None:
            return
        try:
            manifest = self._verify(step, path, checksums=True)
        except CorruptCheckpoint as exc:
            with contextlib.suppress(FileNotFoundError):
                damaged = self.backend.read(f"{path}/{MANIFEST}")
                log.warning("job=%s: step %d is committed but damaged (%s); replacing it", self.job, step, exc)
                if self.backend.read(f"{path}/{MANIFEST}") == damaged:
                    self.backend.remove(f"{path}/{MANIFEST}")
            return
        raise StepAlreadyCommitted(
            f"{self.job}: step {step} was already committed by another writer; refusing to write it again", manifest
        )

    def commit(
        self,
        step: int,
        files: Iterable[FileEntry],
        *,
        tag: str,
        world_size: int = 1,
        metadata: Mapping[str, Any] | None = None,
        writer: Writer | None = None,
        layout: str = "rank",
    ) -> Manifest:
        """Commit ``step`` from the ``tag`` staging area: check the files, write the manifest, move LATEST.

        The files must be there with the sizes given; anything else is refused,
        so a rank's claim is never committed on trust. ``writer`` is the
        fingerprint a later resume compares against its own. If another writer
        committed ``step`` first, its step is kept and this raises
        ``StepAlreadyCommitted`` (carrying that step's manifest); this writer's
        files are removed. ``layout`` is "dcp" for a step of sharded state
        (see ``Manifest.layout``)."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
        staging = self.staging_dir(step, tag)
        manifest = Manifest(job=self.job, step=step, world_size=world_size, files=list(files),
                            metadata=dict(metadata or {}), writer=writer, payload_dir=self.backend.payload_dir(tag),
                            layout=layout)
        for entry in manifest.files:
            size = self.backend.size(f"{staging.rstrip('/')}/{entry.name}")
            if size != entry.size:
                if self._committed_manifest(step, self.backend.join(step_dir_name(step))):
                    self._lost(step, tag, staging)  # e.g. this very staging was committed already
                raise CheckpointError(
                    f"{self.job}: cannot commit step {step}: {entry.name} is "
                    f"{'missing' if size is None else f'{size} bytes'}, expected {entry.size}"
                )
        try:
            fault_point("after_payloads")
            # Under the commit lock (POSIX), the damaged-check, the sequence and
            # the rename are one step for every other committer: nobody can
            # commit between our check and our rename, so nothing we remove
            # can be a step someone else was just told is committed.
            with self.backend.commit_lock():
                if self.backend.atomic_rename:
                    self._replace_if_damaged(step)
                manifest = msgspec.structs.replace(manifest, commit_seq=self._next_commit_seq(), created_at=time.time())
                fresh = self.backend.commit(staging, step, manifest.encode())
            if not fresh:
                self._lost(step, tag, staging)
            self._move_latest(step)
        except OSError as exc:
            raise CheckpointError(f"{self.job}: committing step {step} failed: {exc}") from exc
        return manifest

    def _lost(self, step: int, tag: str, staging: str) -> None:
        path = self.backend.step_dirs().get(step, self.backend.join(step_dir_name(step)))
        existing = self._committed_manifest(step, path)
        if self.backend.atomic_rename or not existing or existing.payload_dir != self.backend.payload_dir(tag):
            # Never referenced by any manifest. (On an object store, the same
            # tag committed twice: those files are the committed step's, and stay.)
            with contextlib.suppress(OSError):
                self.backend.remove(staging)
        try:
            existing = self._verify(step, path)
        except CorruptCheckpoint as exc:
            raise CheckpointError(
                f"{self.job}: step {step} was committed by another writer meanwhile, and that step does not verify "
                f"({exc}); save it again"
            ) from None
        log.warning("job=%s: step %d was already committed by another writer; kept it, discarded this one",
                    self.job, step)
        raise StepAlreadyCommitted(
            f"{self.job}: step {step} was already committed by another writer (commit {existing.commit_seq}); "
            f"kept it, this writer's files were discarded",
            existing,
        )

    def _replace_if_damaged(self, step: int) -> None:
        path = self.backend.step_dirs().get(step)
        if path is None:
            return
        try:
            self._verify(step, path, checksums=True)
        except CorruptCheckpoint as exc:
            log.warning("job=%s: step %d is committed but damaged (%s); replacing it", self.job, step, exc)
            self.backend.remove_step(path)

    def _committed(self) -> dict[int, Manifest | None]:
        """Every step that has a manifest: its manifest, or None where it does not parse."""
        found: dict[int, Manifest | None] = {}
        for step, path in self.backend.step_dirs().items():
            manifest = self._committed_manifest(step, path)
            if manifest is not False:
                found[step] = manifest
        return found

    def manifest(self, step: int) -> Manifest:
        """The manifest of committed ``step``, read and parsed, its files not checked.

        For a rank that loads its own file of a step already verified for it
        (``read`` checks that file's size and checksum): checking every
        rank's files here would cost each rank one request per file, world
        size squared in all, on an object store."""
        path = self.backend.step_dirs().get(step)
        manifest = None if path is None else self._committed_manifest(step, path)
        if not manifest:
            raise CorruptCheckpoint(f"{self.job} step {step}: no committed manifest that parses")
        return manifest

    def _committed_manifest(self, step: int, path: str) -> Manifest | None | bool:
        """The manifest of ``step``; None if it does not parse or is another step's; False if there is none."""
        try:
            raw = self.backend.read(f"{path}/{MANIFEST}")
        except FileNotFoundError:
            return False
        try:
            manifest = Manifest.decode(raw, where=f"{self.job} step {step}")
        except CorruptCheckpoint:
            return None
        return manifest if manifest.step == step and manifest.job == self.job else None

    def _next_commit_seq(self) -> int:
        # One more than any commit so far. Under the POSIX commit lock this is
        # exact; two object-store commits at the same moment may share a number,
        # and then commit time orders them.
        return 1 + max((m.commit_seq for m in self._committed().values() if m is not None), default=0)

    def save(
        self,
        step: int,
        payloads: Mapping[str, Payload],
        *,
        world_size: int = 1,
        metadata: Mapping[str, Any] | None = None,
        writer: Writer | None = None,
        layout: str = "rank",
    ) -> Manifest:
        """Write and commit a whole step from this one process (no coordinator)."""
        tag = uuid.uuid4().hex[:12]
        try:
            entries = [self.write_file(step, name, payload, tag=tag) for name, payload in payloads.items()]
            return self.commit(step, entries, tag=tag, world_size=world_size, metadata=metadata, writer=writer,
                               layout=layout)
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

    @staticmethod
    def _file_path(step_path: str, manifest: Manifest, name: str) -> str:
        """Where a file of a committed step is: in the step directory, or under the winner's tag in it."""
        return "/".join([step_path, manifest.payload_dir, name] if manifest.payload_dir else [step_path, name])

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
            whose = entry.name if entry.rank is None else f"rank {entry.rank}'s file {entry.name}"
            file_path = self._file_path(path, manifest, entry.name)
            size = self.backend.size(file_path)
            if size is None:
                raise CorruptCheckpoint(f"{where}: {whose} is missing")
            if size != entry.size:
                raise CorruptCheckpoint(f"{where}: {whose} is {size} bytes, manifest says {entry.size}")
            if checksums and self.backend.checksum(file_path, algorithm_of(entry.checksum)) != entry.checksum:
                raise CorruptCheckpoint(f"{where}: {whose} failed its checksum")
        return manifest

    def verify(self, step: int, *, checksums: bool = True) -> Manifest:
        """The manifest of committed ``step`` once every file it lists verifies
        (by checksum unless ``checksums=False``); CorruptCheckpoint naming the
        file (and its rank) otherwise, or when the step was never committed."""
        path = self.backend.step_dirs().get(step)
        if path is None:
            raise CorruptCheckpoint(f"{self.job} step {step}: no such step (never committed, or deleted)")
        return self._verify(step, path, checksums=checksums)

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
        path = self._file_path(self.backend.step_dirs().get(manifest.step, ""), manifest, name)
        try:
            data, checksum, exact = self.backend.read_checksummed(path, entry.size, algorithm_of(entry.checksum))
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{self.job} step {manifest.step}: {name} is missing") from None
        if not exact or checksum != entry.checksum:
            whose = name if entry.rank is None else f"rank {entry.rank}'s file {name}"
            raise CorruptCheckpoint(f"{self.job} step {manifest.step}: {whose} failed its checksum")
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
    def reading(self, step: int, *, ttl: float | None = None) -> Iterator[None]:
        """While inside, retention (in any process) will not delete ``step``.

        Writes a lease ``leases/step_N.<id>`` that expires ``ttl`` seconds
        (default: the store's ``lease_ttl``) from now and is renewed every
        third of that while the read goes on, then removed. A reader killed
        meanwhile leaves a lease that retention ignores once it expires. A
        reader that may not write (read-only credentials) is protected in
        this process only, with a warning."""
        ttl = self.lease_ttl if ttl is None else ttl
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        with self._lock:
            self._reading[step] = self._reading.get(step, 0) + 1
        name = f"{step_dir_name(step)}.{uuid.uuid4().hex[:16]}"
        stop = threading.Event()
        renewer = None
        if self._put_lease(name, step, ttl):
            renewer = threading.Thread(target=self._renew_lease, args=(name, step, ttl, stop),
                                       name=f"rankwarden-lease-{step}", daemon=True)
            renewer.start()
        try:
            yield
        finally:
            stop.set()
            if renewer is not None:
                renewer.join()
                with contextlib.suppress(OSError):
                    self.backend.remove_lease(name)
            with self._lock:
                self._reading[step] -= 1
                if not self._reading[step]:
                    del self._reading[step]

    def _put_lease(self, name: str, step: int, ttl: float) -> bool:
        lease = {"step": step, "expires": time.time() + ttl, "host": socket.gethostname(), "pid": os.getpid()}
        try:
            self.backend.put_lease(name, json.dumps(lease).encode())
        except OSError as exc:
            log.warning("job=%s: could not write a reading lease for step %d (%s); only this process will "
                        "keep retention off it", self.job, step, exc)
            return False
        return True

    def _renew_lease(self, name: str, step: int, ttl: float, stop: threading.Event) -> None:
        while not stop.wait(ttl / 3):
            self._put_lease(name, step, ttl)

    def _leased_steps(self, *, step: int | None = None) -> set[int]:
        """Steps (all, or just ``step``) with an unexpired reading lease; expired ones are removed."""
        now, leased = time.time(), set()
        for name in self.backend.leases():
            match = _LEASE.match(name)
            if match is None or (step is not None and int(match.group(1)) != step):
                continue
            try:
                expires = float(json.loads(self.backend.read_lease(name))["expires"])
            except FileNotFoundError:
                continue  # its read just ended
            except (ValueError, KeyError, TypeError):
                expires = 0.0  # not a lease we can honour
            if expires > now:
                leased.add(int(match.group(1)))
            else:
                log.info("job=%s: removing the expired reading lease %s", self.job, name)
                with contextlib.suppress(OSError):
                    self.backend.remove_lease(name)
        return leased

    # -- housekeeping ------------------------------------------------------------------

    def cleanup(self, *, keep_tags: Collection[str] = ()) -> list[str]:
        """Remove everything that failed or finished saves and reads left behind; return what was removed.

        That is: staging areas (``step_N.tmp-<tag>/``; on object stores, tag
        prefixes no manifest names), ``LATEST`` temp files, half-deleted
        steps, incomplete multipart uploads, expired reading leases, and on
        this host the scratch copies of writers that are gone. Never a
        committed step, and never the staging area of an attempt in
        ``keep_tags``: pass the tags of attempts that may still be writing
        (with none, no save may be in progress)."""
        removed = []
        for path in self.backend.garbage(keep_tags):
            log.info("job=%s: removing uncommitted checkpoint data %s", self.job, path)
            self.backend.remove(path)
            removed.append(path)
        for path, upload_id in getattr(self.backend, "incomplete_uploads", list)():
            if self.backend.tag_of(path) in keep_tags:
                continue
            log.info("job=%s: aborting the incomplete upload of %s", self.job, path)
            with contextlib.suppress(OSError):
                self.backend.abort_upload(path, upload_id)
                removed.append(f"{path} (incomplete upload)")
        for name in self.backend.leases():
            if _LEASE.match(name) is None:  # a lease write that never finished
                self.backend.remove_lease(name)
                removed.append(self.backend.join("leases", name))
        self._leased_steps()  # removes the expired ones
        sweep_scratch()
        return removed

    def destroy(self) -> None:
        """Delete every file of this job's store: steps, LATEST, leases, staging, uploads.

        For a job that is being deleted: readers and writers of it must be
        gone (a reading lease does not stop this)."""
        try:
            self.backend.destroy()
        except OSError as exc:
            raise CheckpointError(f"{self.job}: deleting the checkpoint store failed: {exc}") from exc
        log.info("job=%s: deleted the checkpoint store %s", self.job, self.url)

    def retain(self, keep_last: int, *, keep_every: int = 0, protect: Iterable[int] = ()) -> list[int]:
        """Delete committed steps beyond the last ``keep_last`` commits (and every ``keep_every``-th step).

        "Last" is commit order, not step number: after a resume from an older
        step, the steps of the abandoned timeline go first. Never deletes the
        step LATEST names, the newest step that verifies by checksum (in
        commit order, and in step order, which resume uses), a step in
        ``protect``, or one that any process holds a reading lease on.
        Steps without a manifest are in progress or garbage: ``cleanup``'s.
        Returns the deleted steps."""
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        dirs = self.backend.step_dirs()
        committed = {step: m for step, m in self._committed().items() if step in dirs}
        by_commit = sorted(committed, key=lambda step: _commit_order(committed[step]), reverse=True)
        readable = [step for step in by_commit if committed[step] is not None]
        keep = set(readable[:keep_last]) | set(protect)
        if keep_every:
            keep |= {step for step in committed if step % keep_every == 0}
        hint = self._latest_hint()
        if hint is not None:
            keep.add(hint)
        with self._lock:
            keep |= set(self._reading)
        if not set(committed) - keep:
            return []
        verified: dict[int, bool] = {}
        keep |= self._newest_good(readable, dirs, verified) | self._newest_good(sorted(readable, reverse=True), dirs, verified)
        keep |= self._leased_steps()
        deleted = []
        for step in sorted(set(committed) - keep, key=lambda step: _commit_order(committed[step])):
            # A reader may have taken a lease since: look again just before.
            # One taken after this look finds the step gone (and says so);
            # it never reads a wrong state.
            if self._leased_steps(step=step):
                continue
            with self.backend.commit_lock():
                if self._committed_manifest(step, dirs[step]) != committed[step]:
                    continue  # replaced meanwhile by a new commit of that step: not what we decided on
                self.backend.remove_step(dirs[step])
            deleted.append(step)
        if deleted:
            log.info("job=%s: retention deleted steps %s", self.job, deleted)
        return deleted

    def _newest_good(self, steps: list[int], dirs: Mapping[int, str], verified: dict[int, bool]) -> set[int]:
        """The first of ``steps`` that verifies by checksum (``verified`` remembers each answer)."""
        for step in steps:
            if step not in verified:
                try:
                    self._verify(step, dirs[step], checksums=True)
                    verified[step] = True
                except CorruptCheckpoint as exc:
                    log.info("job=%s: retention: step %d does not verify (%s)", self.job, step, exc)
                    verified[step] = False
            if verified[step]:
                return {step}
        return set()
