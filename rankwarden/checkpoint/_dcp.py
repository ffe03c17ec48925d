"""Sharded state through torch.distributed.checkpoint (DCP), under rankwarden's commit.

DCP plans the save (every shard of a DTensor is written by the rank that owns
it; a tensor every rank holds, a DDP replica, by one rank only) and reshards
on load (a step written by 4 ranks loads into 2). rankwarden keeps what DCP
lacks: every file DCP writes goes through ``CheckpointStore.write_file`` into
the attempt's staging area, so it is fsynced and checksummed like any rank
file, listed in the manifest with the rank that wrote it, and committed (or
never) by the manifest; resume verifies it; retention and leases apply.

How: DCP's own ``FileSystemWriter``/``FileSystemReader`` with their file
system replaced by one that talks to the store. The bytes in each file are
exactly what DCP would write (``__<rank>_0.distcp`` per rank, ``.metadata``
by the coordinator rank), so a committed step *is* a DCP checkpoint: plain
``dcp.load(state, checkpoint_id=<step directory>)`` reads it (``dcp_location``
says where that is; on an object store it is the step's payload prefix).
Reads go through ``CheckpointStore.read``: every file a rank touches is
checked against the manifest's checksum before DCP sees a byte of it.

``sync_files`` is off in DCP: its fallback on a non-file stream is a global
``os.sync()``; the store fsyncs each file itself.

Only this module (and ``_torch``) imports torch, lazily.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import threading
from typing import Any, Iterator

from rankwarden.checkpoint._checksum import algorithm_of, checksum_bytes
from rankwarden.checkpoint._faults import fault_point
from rankwarden.checkpoint._manifest import FileEntry, Manifest
from rankwarden.checkpoint._store import CheckpointStore
from rankwarden.errors import CheckpointError, CorruptCheckpoint

__all__ = ["METADATA", "Resharded", "dcp_location", "has_sharded_state", "load_sharded", "save_sharded"]

#: The file DCP's coordinator rank writes last; its presence marks a DCP step.
METADATA = ".metadata"


@dataclasses.dataclass(frozen=True)
class Resharded:
    """The per-rank states of a sharded step written by another world size, one per writer rank.

    A rank of the new world cannot just take "its" old file (there may be
    none, or several are left over): it gets them all and takes what it needs
    (``rankwarden.data`` redistributes data positions from the whole list)."""

    world_size: int
    ranks: list


def has_sharded_state(state: Any) -> bool:
    """True if ``state`` is DCP's job: it holds a DTensor anywhere, or a module or optimizer as a top-level value.

    (DCP calls ``state_dict``/``load_state_dict`` of top-level values itself;
    a module deeper down it would not.)"""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not isinstance(state, dict):
        return False
    from torch.distributed.tensor import DTensor

    if any(isinstance(v, (torch.nn.Module, torch.optim.Optimizer)) for v in state.values()):
        return True
    stack = [state]
    while stack:
        node = stack.pop()
        if isinstance(node, DTensor):
            return True
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return False


class _Buffer(io.BytesIO):
    """A file DCP writes and then closes; its bytes stay readable until the store has them."""

    def close(self) -> None:
        pass


class _MemoryFile(io.RawIOBase):
    """A read-only, seekable file over bytes already in memory (BytesIO would copy them first)."""

    def __init__(self, data) -> None:
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def release(self) -> None:
        self._view.release()

    def readinto(self, buffer) -> int:
        chunk = self._view[self._pos:self._pos + len(buffer)]
        memoryview(buffer).cast("B")[:len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        data = self._view[self._pos:end].tobytes()
        self._pos = max(self._pos, end)
        return data


class _Chunks:
    """A finished in-memory file, handed to the store as one chunk (written and checksummed in parallel)."""

    def __init__(self, buffer: io.BytesIO) -> None:
        self._buffer = buffer

    def chunks(self) -> Iterator[memoryview]:
        yield self._buffer.getbuffer()


@contextlib.contextmanager
def _mapped(store: CheckpointStore, manifest: Manifest, name: str) -> Iterator[Any]:
    """One file of a committed step as a read-only buffer, checked like ``CheckpointStore.read``.

    On local disk the file is memory-mapped and its checksum computed over
    the mapping (no copy: a reader that copies only what it needs, like
    DCP's, then pays one copy, not two); elsewhere it is ``read``. Valid
    inside the ``with`` only."""
    if not store.backend.atomic_rename:
        yield store.read(manifest, name)
        return
    import mmap

    entry = manifest.file(name)
    whose = name if entry.rank is None else f"rank {entry.rank}'s file {name}"
    path = store._file_path(store.backend.step_dirs().get(manifest.step, ""), manifest, name)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != entry.size:
                raise CorruptCheckpoint(f"{store.job} step {manifest.step}: {whose} is {size} bytes, "
                                        f"manifest says {entry.size}")
            # MAP_POPULATE: the page tables filled in one call, not one fault per page.
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mapping = mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ) if size else None
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{store.job} step {manifest.step}: {name} is missing") from None
    try:
        view = memoryview(mapping) if mapping is not None else memoryview(b"")
        try:
            if checksum_bytes(view, algorithm_of(entry.checksum)) != entry.checksum:
                raise CorruptCheckpoint(f"{store.job} step {manifest.step}: {whose} failed its checksum")
            yield view
        finally:
            view.release()
    finally:
        if mapping is not None:
            mapping.close()


def _file_systems():
    from torch.distributed.checkpoint.filesystem import FileSystemBase

    class StoreWriteFS(FileSystemBase):
        """Files DCP creates become staged store files; ``.metadata.tmp`` becomes ``.metadata`` on rename."""

        def __init__(self, store: CheckpointStore, step: int, tag: str, rank: int) -> None:
            self.store, self.step, self.tag, self.rank = store, step, tag, rank
            self.entries: list[FileEntry] = []
            self._pending: dict[str, io.BytesIO] = {}
            self._lock = threading.Lock()

        @contextlib.contextmanager
        def create_stream(self, path, mode: str):
            if "w" not in mode:
                raise CheckpointError(f"the DCP writer only writes; asked to open {path!r} with {mode!r}")
            name = str(path)
            if self.store.backend.atomic_rename:
                # Local disk: DCP serialises straight into the staging file (no
                # copy in memory); the store then fsyncs it while a second thread
                # checksums it from the page cache.
                backend = self.store.backend
                staging = self.store.staging_dir(self.step, self.tag)
                backend._make_base()  # the job directory made durable in its parent first
                backend.files.makedirs(staging)
                with backend.files.open(os.path.join(staging, name), "wb") as stream:
                    yield stream
                fault_point("mid_payload")  # written, neither durable nor reported
                if not name.endswith(".tmp"):
                    self._write(name, os.path.join(staging, name))
                return
            buffer = _Buffer()  # object stores: one upload of the finished file
            yield buffer
            if name.endswith(".tmp"):
                with self._lock:
                    self._pending[name] = buffer  # DCP renames it into place
            else:
                self._write(name, buffer)

        def _write(self, name: str, content) -> None:
            if isinstance(content, str):
                written = content

                def payload(path: str) -> None:  # already written where the store wants it
                    if os.path.abspath(path) != os.path.abspath(written):
                        raise CheckpointError(f"DCP file {written!r} is not where the store expects it ({path!r})")

                entry = self.store.write_file(self.step, name, payload, tag=self.tag, rank=self.rank)
            else:
                entry = self.store.write_file(self.step, name, _Chunks(content), tag=self.tag, rank=self.rank)
            with self._lock:
                self.entries.append(entry)

        def rename(self, path, new_path) -> None:
            if self.store.backend.atomic_rename:
                staging = self.store.staging_dir(self.step, self.tag)
                self.store.backend.files.rename(os.path.join(staging, str(path)), os.path.join(staging, str(new_path)))
                self._write(str(new_path), os.path.join(staging, str(new_path)))
                return
            with self._lock:
                buffer = self._pending.pop(str(path))
            self._write(str(new_path), buffer)

        def concat_path(self, path, suffix: str) -> str:
            return suffix  # names relative to the staging area

        def init_path(self, path):
            return path

        def mkdir(self, path) -> None:
            pass

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id) -> bool:
            return False

        def exists(self, path) -> bool:
            return False  # a staging area is new for every attempt

        def rm_file(self, path) -> None:
            pass

    class StoreReadFS(FileSystemBase):
        """Files DCP opens are served from the store only after their checksum matched the manifest's."""

        def __init__(self, store: CheckpointStore, manifest: Manifest) -> None:
            self.store, self.manifest = store, manifest

        @contextlib.contextmanager
        def create_stream(self, path, mode: str):
            if "r" not in mode:
                raise CheckpointError(f"the DCP reader only reads; asked to open {path!r} with {mode!r}")
            name = str(path)
            if not any(f.name == name for f in self.manifest.files):
                raise CheckpointError(
                    f"{self.store.job} step {self.manifest.step}: DCP asked for {name!r}, which the manifest "
                    "does not list")
            with _mapped(self.store, self.manifest, name) as data:
                stream = _MemoryFile(data)
                try:
                    yield stream
                finally:
                    stream.release()

        def concat_path(self, path, suffix: str) -> str:
            return suffix

        def init_path(self, path):
            return path

        def mkdir(self, path) -> None:
            raise CheckpointError("the DCP reader does not create directories")

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id) -> bool:
            return False

        def exists(self, path) -> bool:
            return any(f.name == str(path) for f in self.manifest.files)

        def rm_file(self, path) -> None:
            raise CheckpointError("the DCP reader does not remove files")

        def rename(self, path, new_path) -> None:
            raise CheckpointError("the DCP reader does not rename files")

    return StoreWriteFS, StoreReadFS


def save_sharded(store: CheckpointStore, step: int, state: dict, *, tag: str, rank: int,
                 process_group: Any = None) -> list[FileEntry]:
    """Write this rank's part of ``state`` for ``step`` into the ``tag`` staging area (collective: every rank calls it).

    Returns this rank's staged files (rank 0's include ``.metadata``), to be
    reported for the commit. Nothing is committed here."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    write_fs, _ = _file_systems()
    writer = FileSystemWriter("", single_file_per_rank=True, sync_files=False, thread_count=1, overwrite=True)
    writer.fs = write_fs(store, step, tag, rank)
    writer.path = ""
    with _translated(f"{store.job}: sharded save of step {step}", rank):
        dcp.save(state, storage_writer=writer, process_group=process_group)
    return sorted(writer.fs.entries, key=lambda e: e.name)


@contextlib.contextmanager
def _translated(what: str, rank: int | None) -> Iterator[None]:
    """DCP's CheckpointException (a BaseException, one entry per failed rank) as rankwarden's error.

    This rank's own CheckpointError (a failed checksum, a step already
    committed) comes out as it is; another rank's failure names that rank."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as exc:
        failures = sorted(exc.failures.items(), key=lambda item: (item[0] != rank, item[0]))
        for failed_rank, (error, _) in failures:
            if failed_rank == rank and isinstance(error, CheckpointError):
                raise error from None
        failed_rank, (error, _) = failures[0]
        raise CheckpointError(f"{what} failed on rank {failed_rank}: {type(error).__name__}: {error}") from None


def load_sharded(store: CheckpointStore, manifest: Manifest, state: dict, *, process_group: Any = None) -> None:
    """Load committed ``manifest``'s DCP state into ``state`` in place (collective), resharding as needed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    if manifest.layout != "dcp":
        raise CheckpointError(
            f"{store.job} step {manifest.step} holds per-rank files (layout {manifest.layout!r}), not sharded "
            "DCP state; restore it without `into=`")
    _, read_fs = _file_systems()
    reader = FileSystemReader("")
    reader.fs = read_fs(store, manifest)
    reader.path = ""
    rank = None
    if process_group is not None or _dist_initialized():
        import torch.distributed as dist

        rank = dist.get_rank(process_group)
    with _translated(f"{store.job}: sharded load of step {manifest.step}", rank if rank is not None else 0):
        dcp.load(state, storage_reader=reader, process_group=process_group)


def _dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def dcp_location(store: CheckpointStore, manifest: Manifest) -> str:
    """Where plain DCP finds committed ``manifest``'s checkpoint: a directory, or an fsspec URL on object stores."""
    if manifest.layout != "dcp":
        raise CheckpointError(f"{store.job} step {manifest.step} is not a DCP checkpoint (layout {manifest.layout!r})")
    path = store.backend.step_dirs().get(manifest.step)
    if path is None:
        raise CheckpointError(f"{store.job} step {manifest.step}: no such step")
    if manifest.payload_dir:
        path = f"{path}/{manifest.payload_dir}"
    protocol = getattr(getattr(store.backend, "fs", None), "protocol", None)
    if protocol:
        scheme = protocol if isinstance(protocol, str) else protocol[0]
        return f"{scheme}://{path}"
    return path
