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

Checksums are CRC-32 (ISA-L through ``isal`` where it is installed, about
9.7 GB/s here, else zlib, about 4 GB/s; both release the GIL),
computed from memory in a second thread while the first writes the same
bytes, so a save costs what the write+fsync costs. sha256 (about 1 GB/s) was
slower than the page-cache write itself; manifests that name it still verify.
A payload written by a function (torch.save) is checksummed by reading it
back while fsync runs.

A read goes into one new buffer, never zeroed first, with the checksum
computed as the bytes arrive: a local file by two threads that each read
(preadv) and CRC one half, joined with ``crc32_combine``; an fsspec file by a
reader and a checksumming thread. The caller compares size and checksum
before handing anything out.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import zlib

try:  # ISA-L's CRC-32: the same polynomial as zlib's, 2-3x faster; loads are bounded by it
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - isal is a dependency; a platform without its wheel falls back
    _crc32 = zlib.crc32
import os
import posixpath
import queue
import shutil
import socket
import tempfile
import threading
import uuid
from typing import Any, Callable, Collection, Iterator, Union

from rankwarden.checkpoint._faults import fault_point
from rankwarden.checkpoint._manifest import FileEntry, parse_step_dir, step_dir_name

__all__ = ["LocalBackend", "ObjectBackend", "Payload", "PosixFiles"]

log = logging.getLogger(__name__)

#: bytes-like content; an object with ``chunks()`` yielding memoryviews (TensorPayload);
#: or a function that writes the file at the local path it is given (torch.save).
Payload = Union[bytes, bytearray, memoryview, Callable[[str], None], Any]

_CHUNK = 8 << 20
MANIFEST = "manifest.json"
LATEST = "LATEST"
LEASES = "leases"
_COMMIT_LOCK = ".commit-lock"


class Checksum:
    """Incremental checksum named by its algorithm: ``crc32:1a2b3c4d`` or ``sha256:<hex>``."""

    def __init__(self, algorithm: str = "crc32") -> None:
        if algorithm not in ("crc32", "sha256"):
            raise ValueError(f"unknown checksum algorithm {algorithm!r}")
        self.algorithm = algorithm
        self._crc = 0
        self._sha = hashlib.sha256() if algorithm == "sha256" else None

    def update(self, data) -> None:
        if self._sha is not None:
            self._sha.update(data)
        else:
            self._crc = _crc32(data, self._crc)

    def value(self) -> str:
        if self._sha is not None:
            return "sha256:" + self._sha.hexdigest()
        return f"crc32:{self._crc:08x}"


def algorithm_of(checksum: str) -> str:
    return checksum.split(":", 1)[0]


def checksum_bytes(data, algorithm: str = "crc32") -> str:
    digest = Checksum(algorithm)
    digest.update(data)
    return digest.value()


def checksum_chunks(chunks, algorithm: str = "crc32") -> str:
    digest = Checksum(algorithm)
    for chunk in chunks:
        digest.update(chunk)
    return digest.value()


def checksum_file(path: str, algorithm: str = "crc32", opener=open) -> str:
    digest = Checksum(algorithm)
    with opener(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.value()


def _new_buffer(size: int) -> bytearray:
    # A bytearray that is not zeroed first: every byte is overwritten by the
    # read (or the buffer is dropped), and zeroing 1 GiB costs a tenth of a second.
    try:
        import ctypes

        make = ctypes.pythonapi.PyByteArray_FromStringAndSize
        make.restype, make.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_ssize_t]
        return make(None, size)
    except (AttributeError, OSError):  # not CPython
        return bytearray(size)


def read_checksummed(f, size: int, algorithm: str = "crc32") -> tuple[bytearray, str, bool]:
    """Read ``f`` into one new buffer of ``size`` bytes while a second thread checksums what has arrived.

    Returns the buffer (cut short if the file is), the checksum of its
    bytes, and whether the file ended exactly at ``size``. zlib releases the
    GIL, and so does the read, so the checksum costs no extra time when the
    disk (or the page cache copy) is the slower of the two."""
    buffer = _new_buffer(size)
    view = memoryview(buffer)
    ready: queue.SimpleQueue = queue.SimpleQueue()
    digest = Checksum(algorithm)

    def checksum_as_read() -> None:
        while (chunk := ready.get()) is not None:
            digest.update(chunk)

    def read() -> int:
        done = 0
        try:
            while done < size:
                got = f.readinto(view[done : done + _CHUNK])
                if not got:
                    break
                ready.put(view[done : done + got])
                done += got
        finally:
            ready.put(None)
        return done

    done, _ = _in_parallel(read, checksum_as_read)
    exact = done == size and not f.read(1)
    if done < size:
        del view
        buffer = buffer[:done]  # a short file: the caller reports it; never hand out unread bytes
    return buffer, digest.value(), exact


_SPLIT_CHUNK = 1 << 20  # read then CRC 1 MiB at a time: the CRC finds it still in the core's cache


def read_path_checksummed(path: str, size: int, algorithm: str = "crc32") -> tuple[bytearray, str, bool]:
    """``read_checksummed`` for a local file, faster: two threads each read and CRC one half.

    With one reader and one checksummer the reader (page faults and the copy
    from the page cache) is the long pole; split in halves, both cores do
    both, each CRCs what it has just read while it is in cache, and the two
    CRCs are combined. When ``exact`` is False the buffer and checksum mean nothing."""
    if algorithm != "crc32" or size < 4 * _SPLIT_CHUNK or not hasattr(os, "preadv"):
        with open(path, "rb", buffering=0) as f:  # unbuffered: the kernel copies straight into the buffer
            return read_checksummed(f, size, algorithm)
    buffer = _new_buffer(size)
    view = memoryview(buffer)
    middle = size // 2 // _SPLIT_CHUNK * _SPLIT_CHUNK
    fd = os.open(path, os.O_RDONLY)
    try:

        def read_part(start: int, end: int) -> tuple[bool, int]:
            crc, position = 0, start
            while position < end:
                got = os.preadv(fd, [view[position : min(position + _SPLIT_CHUNK, end)]], position)
                if not got:
                    return False, crc
                crc = _crc32(view[position : position + got], crc)
                position += got
            return True, crc

        (first_full, first), (second_full, second) = _in_parallel(
            lambda: read_part(0, middle), lambda: read_part(middle, size)
        )
        exact = first_full and second_full and not os.pread(fd, 1, size)
    finally:
        os.close(fd)
    return buffer, f"crc32:{crc32_combine(first, second, size - middle):08x}", exact


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC-32 of A followed by B, from crc32(A), crc32(B) and len(B) (zlib's crc32_combine).

    Appending ``length2`` zero bytes to A is a linear map on its CRC: square
    the one-zero-bit operator (a 32x32 matrix over GF(2)) up to the bits of
    the length and apply the ones that are set; then add B's CRC."""

    def times(matrix: list[int], vector: int) -> int:
        total, row = 0, 0
        while vector:
            if vector & 1:
                total ^= matrix[row]
            vector >>= 1
            row += 1
        return total

    def square(matrix: list[int]) -> list[int]:
        return [times(matrix, matrix[n]) for n in range(32)]

    if length2 <= 0:
        return crc1
    odd = [0xEDB88320] + [1 << n for n in range(31)]  # the operator for one zero bit
    even = square(odd)  # two zero bits
    odd = square(even)  # four zero bits
    while True:
        even = square(odd)  # first pass: one zero byte
        if length2 & 1:
            crc1 = times(even, crc1)
        length2 >>= 1
        if not length2:
            break
        odd = square(even)
        if length2 & 1:
            crc1 = times(odd, crc1)
        length2 >>= 1
        if not length2:
            break
    return crc1 ^ crc2


def _in_parallel(main: Callable[[], Any], side: Callable[[], Any]) -> tuple[Any, Any]:
    """Run ``side`` in a thread while ``main`` runs here; re-raise either's error."""
    box: dict[str, Any] = {}

    def run_side() -> None:
        try:
            box["value"] = side()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run_side, name="rankwarden-checkpoint", daemon=True)
    thread.start()
    try:
        main_value = main()
    finally:
        thread.join()
    if "error" in box:
        raise box["error"]
    return main_value, box["value"]


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


class ObjectBackend(_Backend):
    """An fsspec filesystem without atomic rename: payloads under the writer's tag, manifest last."""

    atomic_rename = False
    #: Size of one multipart upload part for streamed payloads (S3 allows 5 MiB and up).
    part_size = 64 << 20

    def __init__(self, fs, base: str) -> None:
        self.fs = fs
        self.base = base.rstrip("/")

    def join(self, *parts: str) -> str:
        return posixpath.join(self.base, *parts)

    def staging_dir(self, step: int, tag: str) -> str:
        return self.join(step_dir_name(step), tag)

    def payload_dir(self, tag: str) -> str:
        return tag

    def write_payload(self, directory: str, name: str, payload: Payload, rank: int | None) -> FileEntry:
        path = posixpath.join(directory, name)
        if hasattr(payload, "chunks"):
            # Streamed: no local copy. A writer killed midway leaves at most an
            # incomplete multipart upload, which cleanup aborts.
            chunks = list(payload.chunks())
            f = self.fs.open(path, "wb", block_size=self.part_size)
            try:
                for i, chunk in enumerate(chunks):
                    f.write(chunk)
                    if i == len(chunks) // 2:
                        fault_point("mid_payload")
            except BaseException:
                with contextlib.suppress(Exception):
                    if hasattr(f, "discard"):
                        f.discard()  # abort the multipart upload; never complete half a file
                    f.closed = True
                raise
            f.close()
            checksum, size = checksum_chunks(chunks), sum(len(c) for c in chunks)
        elif callable(payload):
            local = os.path.join(scratch_dir(), f"{uuid.uuid4().hex[:12]}-{name}")
            try:
                payload(local)
                checksum = checksum_file(local)
                size = os.path.getsize(local)
                self.fs.put_file(local, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(local)
        else:
            data = bytes(payload)
            checksum, size = checksum_bytes(data), len(data)
            self.fs.pipe_file(path, data)
        return FileEntry(name=name, size=size, checksum=checksum, rank=rank)

    def commit(self, staging: str, step: int, manifest: bytes) -> bool:
        """Write ``step``'s manifest create-only; False if another writer's is already there."""
        step_dir = self.join(step_dir_name(step))
        path = posixpath.join(step_dir, MANIFEST)
        self.fs.invalidate_cache(step_dir)
        try:
            self.fs.pipe_file(path, manifest, mode="create")
        except FileExistsError:
            return False
        except TypeError:  # an fsspec filesystem without create-only writes
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, manifest)
        fault_point("after_rename")
        return True

    def write_latest(self, step: int) -> None:
        self.fs.pipe_file(self.join(LATEST), (step_dir_name(step) + "\n").encode())

    def read(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def read_checksummed(self, path: str, size: int, algorithm: str) -> tuple[bytearray, str, bool]:
        with self.fs.open(path, "rb") as f:
            return read_checksummed(f, size, algorithm)

    def size(self, path: str) -> int | None:
        try:
            return int(self.fs.size(path))
        except FileNotFoundError:
            return None

    def checksum(self, path: str, algorithm: str) -> str:
        return checksum_file(path, algorithm, opener=self.fs.open)

    def _names(self, path: str | None = None) -> list[str]:
        path = path or self.base
        self.fs.invalidate_cache(path)
        try:
            return [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []

    def step_dirs(self) -> dict[int, str]:
        return {step: self.join(name) for name in self._names() if (step := parse_step_dir(name)) is not None}

    def garbage(self, keep_tags: Collection[str] = ()) -> list[str]:
        """Payload prefixes that no manifest names, except those of the attempts in ``keep_tags``.

        A step whose manifest cannot be read is left alone (retention's). A
        manifest key is never garbage: a step committed meanwhile keeps it."""
        found = []
        for path in sorted(self.step_dirs().values()):
            entries = self._names(path)
            named = None
            if MANIFEST in entries:
                try:
                    named = json.loads(self.read(posixpath.join(path, MANIFEST))).get("payload_dir", "")
                except FileNotFoundError:
                    pass  # removed meanwhile: the step is gone
                except (ValueError, AttributeError):
                    continue
                if named is not None and not isinstance(named, str):
                    continue
            for entry in entries:
                if entry == MANIFEST or entry in keep_tags:
                    continue
                if named is not None and (entry == named or not named):
                    continue  # the committed files (or, in the old layout, files beside the manifest)
                found.append(posixpath.join(path, entry))
        return found

    def remove(self, path: str) -> None:
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    def remove_step(self, path: str) -> None:
        # The manifest goes first: from then on the step does not exist.
        try:
            self.fs.rm_file(posixpath.join(path, MANIFEST))
        except FileNotFoundError:
            pass
        self.remove(path)

    # -- reading leases: one small object per reader ---------------------------------

    def put_lease(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self.join(LEASES, name), data)  # one PUT: never half a lease

    def leases(self) -> list[str]:
        return sorted(self._names(self.join(LEASES)))

    def read_lease(self, name: str) -> bytes:
        return self.read(self.join(LEASES, name))

    def remove_lease(self, name: str) -> None:
        try:
            self.fs.rm_file(self.join(LEASES, name))
        except FileNotFoundError:
            pass

    # -- incomplete multipart uploads (S3 only) -----------------------------------------

    def incomplete_uploads(self) -> list[tuple[str, str]]:
        """(key path, upload id) of every multipart upload under this job that never completed."""
        if not hasattr(self.fs, "call_s3"):
            return []
        bucket, _, prefix = self.base.partition("/")
        found, markers = [], {}
        while True:
            page = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=f"{prefix}/", **markers)
            found += [(f"{bucket}/{u['Key']}", u["UploadId"]) for u in page.get("Uploads", [])]
            if not page.get("IsTruncated"):
                return found
            markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    def abort_upload(self, path: str, upload_id: str) -> None:
        bucket, _, key = path.partition("/")
        self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)

    def tag_of(self, path: str) -> str | None:
        """The writer's tag of a payload key ``<base>/step_N/<tag>/<name>``, or None."""
        parts = path[len(self.base) + 1:].split("/") if path.startswith(self.base + "/") else []
        return parts[1] if len(parts) == 3 and parse_step_dir(parts[0]) is not None else None

    def destroy(self) -> None:
        for path, upload_id in self.incomplete_uploads():
            self.abort_upload(path, upload_id)
        for path in self.step_dirs().values():  # the steps stop existing first
            try:
                self.fs.rm_file(posixpath.join(path, MANIFEST))
            except FileNotFoundError:
                pass
        self.remove(self.base)
        self.fs.invalidate_cache(self.base)
