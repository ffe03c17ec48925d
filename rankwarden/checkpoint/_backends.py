"""Where checkpoint bytes go: a POSIX directory, or an object store through fsspec.

Both backends give the store the same few operations; the difference is how
a step becomes visible.

POSIX (local disk, NFS): payloads and then the manifest are written into
``step_N.tmp-<tag>/`` and fsynced, the directory is fsynced, renamed to
``step_N/``, and the parent fsynced. The rename is the commit: a reader never
sees a step directory without a complete manifest and payloads.

Object stores (S3, GCS, memory://) have no rename: each attempt writes its
payloads under its own prefix ``step_N/<tag>/``, then the manifest
``step_N/manifest.json`` (create-only where the store supports it, so two
committers can never both win) names that prefix. Two writers of one step
never touch each other's files, and the manifest only ever references the
winner's. A ``step_N/`` without a manifest is not a step, and a tag prefix the
manifest does not name is a loser's or a dead writer's: garbage once no
writer of it is active.

Garbage a crash can leave, and what removes it (``CheckpointStore.cleanup``):
``step_N.tmp-<tag>/``, ``LATEST.tmp-*``, ``*.deleting-*`` (POSIX); unnamed tag
prefixes and incomplete multipart uploads (S3); expired reading leases; and
the local scratch copies that function payloads are written to before an
upload, which live in a per-process directory removed at exit and swept when
their process is gone.

Checksums and the read path: ``_checksum``. Object stores: ``_object``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import uuid
from typing import Any, Callable, Collection, Iterator, Union

from rankwarden.checkpoint._checksum import _in_parallel, checksum_bytes, checksum_chunks, checksum_file, read_path_checksummed
from rankwarden.checkpoint._faults import fault_point
from rankwarden.checkpoint._manifest import FileEntry, parse_step_dir, step_dir_name

__all__ = ["LocalBackend", "Payload", "PosixFiles"]

log = logging.getLogger(__name__)

#: bytes-like content; an object with ``chunks()`` yielding memoryviews (TensorPayload);
#: or a function that writes the file at the local path it is given (torch.save).
Payload = Union[bytes, bytearray, memoryview, Callable[[str], None], Any]

_CHUNK = 8 << 20
MANIFEST = "manifest.json"
LATEST = "LATEST"
LEASES = "leases"
_COMMIT_LOCK = ".commit-lock"

class PosixFiles:
    """The file-system calls that LocalBackend's write, commit and removal paths make.

    A seam: ``rankwarden.testing.PowerLossFiles`` stands in for it, records
    each call and works out what a power cut after any of them would leave
    on disk. Reads and listings do not go through it."""

    def open(self, path: str, mode: str):
        return open(path, mode)

    def fsync(self, f) -> None:
        os.fsync(f.fileno())

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def remove(self, path: str) -> None:
        os.remove(path)

    def rmtree(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)


_OS = PosixFiles()


def _write_chunks_durably(path: str, chunks: list, files: PosixFiles = _OS) -> None:
    with files.open(path, "wb") as f:
        for i, chunk in enumerate(chunks):
            f.write(chunk)
            if i == len(chunks) // 2:
                f.flush()
                fault_point("mid_payload")
        f.flush()
        files.fsync(f)


def _write_durably(path: str, data: bytes, *, crash_midway: str | None = None, files: PosixFiles = _OS) -> None:
    with files.open(path, "wb") as f:
        if crash_midway:
            half = len(data) // 2
            f.write(data[:half])
            f.flush()
            fault_point(crash_midway)
            f.write(data[half:])
        else:
            f.write(data)
        f.flush()
        files.fsync(f)


# -- local scratch copies (function payloads bound for an object store) -------------
#
# torch.save needs a local path. Its file lives in a directory owned by this
# process (named after the host, the pid and the pid's start time, so a reused
# pid is not mistaken for the owner), removed at exit; a process killed
# before that leaves it, and the next sweep on that host (cleanup, or the next
# process that needs scratch space) removes the directories of dead owners.

_scratch_lock = threading.Lock()
_scratch: str | None = None


def _scratch_root() -> str:
    return os.path.join(tempfile.gettempdir(), "rankwarden-scratch")


def _start_time(pid: int) -> str | None:
    """The pid's start time (clock ticks since boot), "" without /proc, None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except FileNotFoundError:
        return None
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""


def scratch_dir() -> str:
    """This process's scratch directory (created on first use, removed at exit)."""
    global _scratch
    with _scratch_lock:
        if _scratch is None or not os.path.isdir(_scratch):
            sweep_scratch()
            pid = os.getpid()
            path = os.path.join(_scratch_root(), f"{socket.gethostname()}.{pid}.{_start_time(pid) or 0}")
            os.makedirs(path, exist_ok=True)
            if _scratch is None:
                atexit.register(_remove_scratch)
            _scratch = path
        return _scratch


def _remove_scratch() -> None:
    if _scratch is not None:
        shutil.rmtree(_scratch, ignore_errors=True)


def sweep_scratch() -> list[str]:
    """Remove the scratch directories of processes on this host that are gone."""
    root, host = _scratch_root(), socket.gethostname()
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    removed = []
    for name in names:
        rest = name.rsplit(".", 2)  # host (may hold dots), pid, start time
        if len(rest) != 3 or rest[0] != host or not rest[1].isdigit():
            continue
        started = _start_time(int(rest[1]))
        if started is None or (started and rest[2] != started):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(os.path.join(root, name))
    if removed:
        log.info("removed the checkpoint scratch directories of finished processes: %s", removed)
    return removed


class _Backend:
    def join(self, *parts: str) -> str:
        raise NotImplementedError

    def read(self, path: str) -> bytes:
        raise NotImplementedError

    def read_latest(self) -> bytes | None:
        try:
            return self.read(self.join(LATEST))
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def commit_lock(self) -> Iterator[None]:
        """Held around every change of which steps are committed (where the store can lock)."""
        yield


class LocalBackend(_Backend):
    """A directory on a POSIX filesystem: temp dir, fsync, rename."""

    atomic_rename = True

    def __init__(self, base: str, files: PosixFiles | None = None) -> None:
        self.base = os.path.abspath(base)
        #: Every write, fsync, rename and removal goes through this (a test seam).
        self.files = files or _OS

    def join(self, *parts: str) -> str:
        return os.path.join(self.base, *parts)

    def staging_dir(self, step: int, tag: str) -> str:
        return self.join(f"{step_dir_name(step)}.tmp-{tag}")

    def payload_dir(self, tag: str) -> str:
        return ""  # the rename moves the files into the step directory itself

    @contextlib.contextmanager
    def commit_lock(self) -> Iterator[None]:
        # flock: two committers (threads or processes, on this host or over
        # NFSv4) never interleave their checks and renames; the kernel drops
        # the lock of a writer that dies.
        import fcntl

        self._make_base()
        fd = os.open(self.join(_COMMIT_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _make_base(self) -> None:
        # A step committed in a job directory that a power cut can take away
        # with it is not committed: each directory made here (the job's, and
        # any above it) is made durable in its parent before anything in it counts.
        if os.path.isdir(self.base):
            return
        missing, path = [], self.base
        while not os.path.isdir(path):
            missing.append(path)
            path = os.path.dirname(path)
        for path in reversed(missing):
            self.files.makedirs(path)
            self.files.fsync_dir(os.path.dirname(path))

    def write_payload(self, directory: str, name: str, payload: Payload, rank: int | None) -> FileEntry:
        self._make_base()
        self.files.makedirs(directory)
        path = os.path.join(directory, name)
        if hasattr(payload, "chunks"):
            chunks = list(payload.chunks())
            _, checksum = _in_parallel(lambda: _write_chunks_durably(path, chunks, self.files), lambda: checksum_chunks(chunks))
            size = sum(len(c) for c in chunks)
        elif callable(payload):
            payload(path)
            with self.files.open(path, "rb") as f:
                # fsync (disk) and the checksum (CPU, reading the page cache) overlap.
                _, checksum = _in_parallel(lambda: self.files.fsync(f), lambda: checksum_file(path))
                size = os.fstat(f.fileno()).st_size
        else:
            data = memoryview(payload).cast("B")
            _, checksum = _in_parallel(lambda: _write_durably(path, data, crash_midway="mid_payload", files=self.files),
                                       lambda: checksum_bytes(data))
            size = len(data)
        return FileEntry(name=name, size=size, checksum=checksum, rank=rank)

    def commit(self, staging: str, step: int, manifest: bytes) -> bool:
        """Make ``staging`` the committed ``step``; False if that step was already committed.

        Call it inside ``commit_lock``: the check, the removal of a manifest-less
        leftover and the rename are then one step for every other committer."""
        final = self.join(step_dir_name(step))
        if os.path.exists(os.path.join(final, MANIFEST)):
            self.files.rmtree(staging)
            return False
        _write_durably(os.path.join(staging, MANIFEST), manifest, crash_midway="mid_manifest", files=self.files)
        self.files.fsync_dir(staging)
        fault_point("before_rename")
        if os.path.exists(final) and not os.path.exists(os.path.join(final, MANIFEST)):
            self._discard(final)  # a manifest-less leftover from an older layout or a crash
        try:
            # rename(2) never replaces a non-empty directory: a step committed
            # by a writer that ignored the lock is kept, and this one loses.
            self.files.rename(staging, final)
        except OSError as exc:
            if not os.path.exists(os.path.join(final, MANIFEST)):
                raise
            log.debug("step %d appeared while committing (%s)", step, exc)
            self.files.rmtree(staging)
            return False
        self.files.fsync_dir(self.base)
        fault_point("after_rename")
        return True

    def write_latest(self, step: int) -> None:
        tmp = self.join(f"{LATEST}.tmp-{uuid.uuid4().hex[:8]}")
        _write_durably(tmp, (step_dir_name(step) + "\n").encode(), crash_midway="mid_latest", files=self.files)
        self.files.replace(tmp, self.join(LATEST))
        self.files.fsync_dir(self.base)

    def read(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def read_checksummed(self, path: str, size: int, algorithm: str) -> tuple[bytearray, str, bool]:
        return read_path_checksummed(path, size, algorithm)

    def size(self, path: str) -> int | None:
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            return None

    def checksum(self, path: str, algorithm: str) -> str:
        return checksum_file(path, algorithm)

    def step_dirs(self) -> dict[int, str]:
        try:
            names = os.listdir(self.base)
        except FileNotFoundError:
            return {}
        return {step: self.join(name) for name in names if (step := parse_step_dir(name)) is not None}

    def garbage(self, keep_tags: Collection[str] = ()) -> list[str]:
        """Temp directories and files of saves that never committed, and half-deleted steps.

        The staging directories of the attempts in ``keep_tags`` (still writing) are spared."""
        try:
            names = os.listdir(self.base)
        except FileNotFoundError:
            return []
        spared = set()
        for name in names:
            stem, sep, tag = name.partition(".tmp-")
            if sep and tag in keep_tags and parse_step_dir(stem) is not None:
                spared.add(name)
        return [self.join(n) for n in sorted(names) if (".tmp-" in n or ".deleting-" in n) and n not in spared]

    # -- reading leases: one small file per reader -----------------------------------

    def put_lease(self, name: str, data: bytes) -> None:
        directory = self.join(LEASES)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f"{name}.tmp-{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(directory, name))  # a reader of it never sees half a lease

    def leases(self) -> list[str]:
        try:
            return sorted(os.listdir(self.join(LEASES)))
        except FileNotFoundError:
            return []

    def read_lease(self, name: str) -> bytes:
        return self.read(self.join(LEASES, name))

    def remove_lease(self, name: str) -> None:
        self.remove(self.join(LEASES, name))

    def destroy(self) -> None:
        # The steps stop existing first (atomically, one by one), then the rest goes.
        for path in self.step_dirs().values():
            self._discard(path)
        shutil.rmtree(self.base, ignore_errors=True)
        if os.path.exists(self.base):
            raise OSError(f"could not remove {self.base}")

    def remove(self, path: str) -> None:
        if os.path.isdir(path):
            self._discard(path)
        else:
            try:
                self.files.remove(path)
            except FileNotFoundError:
                pass

    def remove_step(self, path: str) -> None:
        # Rename first: the step stops existing atomically, then its bytes go.
        self._discard(path)

    def _discard(self, path: str) -> None:
        doomed = f"{path}.deleting-{uuid.uuid4().hex[:8]}"
        try:
            self.files.rename(path, doomed)
        except FileNotFoundError:
            return
        self.files.fsync_dir(os.path.dirname(doomed))
        self.files.rmtree(doomed)
