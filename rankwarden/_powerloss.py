"""Power-loss models of checkpoint storage: what survives a cut at any point of a save.

``PowerLossFiles`` stands in for ``LocalBackend``'s ``PosixFiles`` seam. It
does every call for real (so the writer runs normally) and records it; then
``states()`` works out, for a power cut after each recorded operation, every
file tree the disk may come back with. A test materialises each tree into a
fresh directory and opens a fresh ``CheckpointStore`` on it.

The POSIX model is deliberately weaker than any real filesystem's defaults:

- a file's bytes are durable up to its last fsync; what was written after it
  may come back lost, kept, or (delayed allocation) as zeros at the new size;
- a directory entry (create, mkdir, rename, unlink) is durable only once its
  directory has been fsynced after it; fsync of a file does not make its
  name durable, and fsync of a directory makes nothing inside its
  subdirectories durable;
- of the entries not yet durable, any prefix in issue order may survive (a
  journal committing in order), or all but any one of them (reordering).
  An operation whose source did not survive (a rename of a file whose
  creation was lost) is lost with it.

Not modelled: torn sector writes inside a fsynced range, a lying disk
cache, errors from fsync itself, and arbitrary subsets of more than one lost
entry (prefixes and all-but-one bound the enumeration).

``PowerLossObjectStore`` wraps an fsspec filesystem with the object-store
model: a PUT is atomic and an object exists only once its PUT has completed
(a streamed upload becomes one PUT at ``close``); a bulk delete is one
DELETE per object, each a cut; whatever completed survives the writer.

Both take ``mark(label)`` between the operations of a test (a save returned,
retention deleted a step); each state carries the marks made before its cut.
"""

from __future__ import annotations

import io
import os
import shutil
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

__all__ = ["CrashState", "PowerLossFiles", "PowerLossObjectStore"]

_NAMESPACE = ("link", "unlink", "rename")


@dataclass(frozen=True)
class CrashState:
    """One tree a power cut may leave: relative path -> bytes (a file) or None (a directory)."""

    #: Operations done before the cut.
    cut: int
    #: The ``mark`` labels made before the cut, in order.
    marks: tuple
    files: Mapping[str, bytes | None]
    #: What survived, in words (for failure messages).
    how: str

    def materialise(self, directory: str) -> None:
        """Write the tree under ``directory`` (a fresh local directory, made here)."""
        os.makedirs(directory, exist_ok=True)
        for path, data in sorted(self.files.items()):
            target = os.path.join(directory, *path.split("/"))
            if data is None:
                os.makedirs(target, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "wb") as f:
                    f.write(data)

    def put_objects(self, fs, root: str) -> None:
        """Write the objects under ``root`` of the fsspec filesystem ``fs``."""
        for path, data in sorted(self.files.items()):
            if data is not None:
                fs.pipe_file(f"{root.rstrip('/')}/{path}", data)


@dataclass(frozen=True)
class _Op:
    kind: str
    args: tuple
    text: str


class _RecordingFile:
    """A file opened for writing through the model: each write is an operation."""

    def __init__(self, f, model: "PowerLossFiles", ino: int) -> None:
        self._f, self._model, self._ino = f, model, ino

    @property
    def name(self) -> str:
        return self._f.name

    def write(self, data) -> int:
        n = self._f.write(data)
        self._model._record("write", self._ino, bytes(data), text=f"write {len(data)} bytes to {self._model._rel(self.name)}")
        return n

    def flush(self) -> None:
        self._f.flush()

    def fileno(self) -> int:
        return self._f.fileno()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "_RecordingFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class PowerLossFiles:
    """``PosixFiles`` that records every call under ``root`` and enumerates what a power cut leaves.

    Use it on an empty ``root``: ``store.backend.files = PowerLossFiles(root)``
    for ``CheckpointStore(root, job)``. Files a callee writes behind the seam
    (``torch.save`` to a path) are noticed when they are fsynced, or when
    their directory is."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)
        if os.listdir(self.root):
            raise ValueError(f"{self.root} is not empty: the model starts from an empty directory")
        self._lock = threading.RLock()
        self._ops: list[_Op] = []
        self._entries: dict[int, dict[str, int]] = {0: {}}  # directory inode -> name -> inode
        self._is_dir: dict[int, bool] = {0: True}
        self._data: dict[int, bytes] = {}  # file inode -> current bytes (live view)
        self._inodes = 1

    # -- the seam ------------------------------------------------------------------

    def open(self, path: str, mode: str):
        f = open(path, mode)
        if mode in ("r", "rb"):
            return f
        if mode not in ("w", "wb"):
            raise ValueError(f"PowerLossFiles models whole-file writes only, not mode {mode!r}")
        with self._lock:
            where = self._where(path)
            if where is None:
                return f
            parent, name = where
            ino = self._entries[parent].get(name)
            if ino is None:
                ino = self._link(parent, name, is_dir=False, text=f"create {self._rel(path)}")
            else:
                self._record("trunc", ino, text=f"truncate {self._rel(path)}")
            return _RecordingFile(f, self, ino)

    def fsync(self, f) -> None:
        real = f._f if isinstance(f, _RecordingFile) else f
        with self._lock:
            os.fsync(real.fileno())
            ino = f._ino if isinstance(f, _RecordingFile) else self._discover(f.name)
            if ino is not None:
                self._record("fsync", ino, text=f"fsync {self._rel(f.name)}")

    def fsync_dir(self, path: str) -> None:
        with self._lock:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            ino = self._ensure_dirs(path)
            if ino is None:
                return
            for name in sorted(os.listdir(path)):  # files written behind the seam
                if name not in self._entries[ino] and os.path.isfile(os.path.join(path, name)):
                    self._discover(os.path.join(path, name))
            self._record("fsync_dir", ino, text=f"fsync directory {self._rel(path)}")

    def makedirs(self, path: str) -> None:
        with self._lock:
            os.makedirs(path, exist_ok=True)
            self._ensure_dirs(path)

    def rename(self, src: str, dst: str) -> None:
        self._rename(src, dst, os.rename)

    def replace(self, src: str, dst: str) -> None:
        self._rename(src, dst, os.replace)

    def remove(self, path: str) -> None:
        with self._lock:
            os.remove(path)
            where = self._where(path)
            if where is not None and where[1] in self._entries[where[0]]:
                self._unlink(*where)

    def rmtree(self, path: str) -> None:
        with self._lock:
            where = self._where(path)
            shutil.rmtree(path, ignore_errors=True)
            if where is None or where[1] not in self._entries[where[0]] or os.path.exists(path):
                return

            def remove_tree(parent: int, name: str) -> None:  # what rmtree does: children first
                ino = self._entries[parent][name]
                if self._is_dir[ino]:
                    for child in sorted(self._entries[ino]):
                        remove_tree(ino, child)
                self._unlink(parent, name)

            remove_tree(*where)

    # -- for the test ----------------------------------------------------------------

    def mark(self, label: Any) -> None:
        """Note an event of the test (a save returned); states after it carry ``label``."""
        with self._lock:
            self._record("mark", label, text=f"(mark {label!r})")

    def history(self, cut: int, last: int = 12) -> str:
        """The last operations before ``cut``, numbered, for failure messages."""
        lines = [f"  {i + 1:4d} {op.text}" for i, op in enumerate(self._ops[:cut])]
        return "\n".join(lines[-last:])

    def states(self) -> Iterator[CrashState]:
        """Every tree a power cut may leave, after each operation (and before the first)."""
        with self._lock:
            ops = list(self._ops)
        for cut in range(len(ops) + 1):
            if cut == 0 or ops[cut - 1].kind != "mark":
                yield from self._states_at(ops, cut)

    # -- crash states ----------------------------------------------------------------

    def _states_at(self, ops: list[_Op], cut: int) -> Iterator[CrashState]:
        marks = tuple(op.args[0] for op in ops[:cut] if op.kind == "mark")
        # A directory entry is durable once every directory it touches was
        # fsynced after it; file bytes, up to the file's last fsync.
        synced: set[int] = set()
        durable: dict[int, bool] = {}
        for i in reversed(range(cut)):
            op = ops[i]
            if op.kind == "fsync_dir":
                synced.add(op.args[0])
            elif op.kind in _NAMESPACE:
                durable[i] = all(d in synced for d in self._dirs_of(op))
        current: dict[int, bytes] = {}
        on_disk: dict[int, bytes] = {}
        for op in ops[:cut]:
            if op.kind == "write":
                current[op.args[0]] = current.get(op.args[0], b"") + op.args[1]
            elif op.kind == "trunc":
                current[op.args[0]] = b""
            elif op.kind == "set":
                current[op.args[0]] = op.args[1]
            elif op.kind == "fsync":
                on_disk[op.args[0]] = current.get(op.args[0], b"")
        pending = [i for i in sorted(durable) if not durable[i]]
        choices = [(set(pending[:k]), f"the first {k} of {len(pending)} un-synced directory entries")
                   for k in range(len(pending) + 1)]
        if len(pending) > 1:
            choices += [(set(pending) - {i}, f"every un-synced directory entry but '{ops[i].text}'") for i in pending]
        after = f"power cut after operation {cut}" + (f" ({ops[cut - 1].text})" if cut else " (none done)")
        seen = set()
        for keep, entries_how in choices:
            tree = self._replay(ops, sorted(durable), durable, keep)
            for data_how in ("lost", "kept", "zeroed"):
                files: dict[str, bytes | None] = {}
                for path, ino in tree.items():
                    if self._is_dir[ino]:
                        files[path] = None
                        continue
                    now, synced_bytes = current.get(ino, b""), on_disk.get(ino, b"")
                    if data_how == "lost":
                        files[path] = synced_bytes
                    elif data_how == "kept":
                        files[path] = now
                    else:
                        files[path] = synced_bytes[: len(now)] + bytes(max(0, len(now) - len(synced_bytes)))
                key = frozenset(files.items())
                if key in seen:
                    continue
                seen.add(key)
                how = f"{after}: {entries_how} survived; un-synced file bytes {data_how}"
                yield CrashState(cut=cut, marks=marks, files=files, how=how)

    def _dirs_of(self, op: _Op) -> tuple[int, ...]:
        if op.kind == "rename":
            return (op.args[0], op.args[2])
        return (op.args[0],)

    def _replay(self, ops: list[_Op], namespace: list[int], durable: dict[int, bool], keep: set[int]) -> dict[str, int]:
        entries: dict[int, dict[str, int]] = {0: {}}
        for i in namespace:
            if not (durable[i] or i in keep):
                continue
            op = ops[i]
            if op.kind == "link":
                parent, name, ino = op.args
                entries.setdefault(parent, {})[name] = ino
            elif op.kind == "unlink":
                parent, name, ino = op.args
                if entries.get(parent, {}).get(name) == ino:
                    del entries[parent][name]
            else:
                src, src_name, dst, dst_name, ino = op.args
                if entries.get(src, {}).get(src_name) == ino:  # else its source was lost
                    del entries[src][src_name]
                    entries.setdefault(dst, {})[dst_name] = ino
        tree: dict[str, int] = {}

        def walk(ino: int, prefix: str) -> None:
            for name, child in entries.get(ino, {}).items():
                tree[prefix + name] = child
                if self._is_dir[child]:
                    walk(child, prefix + name + "/")

        walk(0, "")
        return tree

    # -- the live namespace ------------------------------------------------------------

    def _record(self, kind: str, *args: Any, text: str) -> None:
        self._ops.append(_Op(kind, args, text))
        if kind == "write":
            self._data[args[0]] = self._data.get(args[0], b"") + args[1]
        elif kind == "trunc":
            self._data[args[0]] = b""
        elif kind == "set":
            self._data[args[0]] = args[1]

    def _rel(self, path: str) -> str:
        return os.path.relpath(os.path.abspath(path), self.root)

    def _parts(self, path: str) -> list[str] | None:
        rel = self._rel(path)
        if rel == "." or rel == ".." or rel.startswith(".." + os.sep):
            return None
        return rel.split(os.sep)

    def _ensure_dirs(self, path: str) -> int | None:
        """The inode of directory ``path`` under the root, recording any the model had not seen."""
        parts = self._parts(path)
        if parts is None:
            return 0 if os.path.abspath(path) == self.root else None
        ino = 0
        for depth, name in enumerate(parts):
            child = self._entries[ino].get(name)
            if child is None:
                child = self._link(ino, name, is_dir=True, text=f"mkdir {'/'.join(parts[:depth + 1])}")
            ino = child
        return ino

    def _where(self, path: str) -> tuple[int, str] | None:
        parts = self._parts(path)
        if parts is None:
            return None
        parent = self._ensure_dirs(os.path.dirname(os.path.abspath(path)))
        return None if parent is None else (parent, parts[-1])

    def _link(self, parent: int, name: str, *, is_dir: bool, text: str) -> int:
        ino = self._inodes
        self._inodes += 1
        self._is_dir[ino] = is_dir
        if is_dir:
            self._entries[ino] = {}
        self._entries[parent][name] = ino
        self._record("link", parent, name, ino, text=text)
        return ino

    def _unlink(self, parent: int, name: str) -> None:
        ino = self._entries[parent].pop(name)
        self._record("unlink", parent, name, ino, text=f"{'rmdir' if self._is_dir[ino] else 'unlink'} "
                     f"{self._path_of(parent)}{name}")

    def _path_of(self, ino: int) -> str:
        def find(at: int, prefix: str) -> str | None:
            for name, child in self._entries.get(at, {}).items():
                if child == ino:
                    return prefix + name + "/"
                if self._is_dir[child] and (found := find(child, prefix + name + "/")) is not None:
                    return found
            return None

        return "" if ino == 0 else (find(0, "") or f"<inode {ino}>/")

    def _discover(self, path: str) -> int | None:
        """Track a file written behind the seam: its name (if new) and its bytes (not yet durable)."""
        where = self._where(path)
        if where is None:
            return None
        parent, name = where
        with open(path, "rb") as f:
            data = f.read()
        ino = self._entries[parent].get(name)
        if ino is None:
            ino = self._link(parent, name, is_dir=False, text=f"create {self._rel(path)} (behind the seam)")
        if self._data.get(ino, b"") != data:
            self._record("set", ino, data, text=f"write {len(data)} bytes to {self._rel(path)} (behind the seam)")
        return ino

    def _rename(self, src: str, dst: str, call) -> None:
        with self._lock:
            if os.path.isfile(src):
                self._discover(src)
            call(src, dst)
            s, d = self._where(src), self._where(dst)
            if s is None or d is None or s[1] not in self._entries[s[0]]:
                return
            ino = self._entries[s[0]].pop(s[1])
            self._entries[d[0]][d[1]] = ino
            self._record("rename", s[0], s[1], d[0], d[1], ino, text=f"rename {self._rel(src)} -> {self._rel(dst)}")


class _Upload(io.RawIOBase):
    """A streamed upload: nothing exists until ``close`` completes it in one PUT."""

    def __init__(self, store: "PowerLossObjectStore", path: str) -> None:
        super().__init__()
        self._store, self._path, self._buffer, self._discarded = store, path, bytearray(), False

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._buffer += data
        return len(data)

    def discard(self) -> None:
        self._discarded = True

    def close(self) -> None:
        if not self.closed and not self._discarded:
            self._store.pipe_file(self._path, bytes(self._buffer))
        super().close()


class PowerLossObjectStore:
    """An fsspec filesystem wrapper with the object-store model of a writer killed at any point.

    Every call goes to ``fs``; the completed PUTs and DELETEs under ``root``
    are recorded, and ``states()`` gives the objects after each of them.
    Use it as ``store.backend.fs = PowerLossObjectStore(store.backend.fs, root)``."""

    def __init__(self, fs, root: str) -> None:
        self.fs = fs
        self.root = fs._strip_protocol(root).rstrip("/")
        self._lock = threading.RLock()
        self._objects: dict[str, bytes] = {}
        self._log: list[tuple[str, Any, dict[str, bytes]]] = []  # (text, mark label or None, objects after)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fs, name)

    def _rel(self, path: str) -> str | None:
        path = self.fs._strip_protocol(path)
        return path[len(self.root) + 1:] if path.startswith(self.root + "/") else None

    def _done(self, text: str, path: str, data: bytes | None) -> None:
        rel = self._rel(path)
        if rel is None:
            return
        if data is None:
            self._objects.pop(rel, None)
        else:
            self._objects[rel] = data
        self._log.append((text, None, dict(self._objects)))

    def pipe_file(self, path: str, value, mode: str = "overwrite", **kwargs: Any) -> None:
        with self._lock:
            if mode == "overwrite":
                self.fs.pipe_file(path, value, **kwargs)
            else:
                self.fs.pipe_file(path, value, mode=mode, **kwargs)
            self._done(f"PUT {self._rel(path)} ({len(value)} bytes{', create-only' if mode == 'create' else ''})",
                       path, bytes(value))

    def put_file(self, lpath: str, rpath: str, **kwargs: Any) -> None:
        with open(lpath, "rb") as f:
            self.pipe_file(rpath, f.read())

    def open(self, path: str, mode: str = "rb", **kwargs: Any):
        if "r" in mode:
            return self.fs.open(path, mode, **kwargs)
        return _Upload(self, path)

    def rm_file(self, path: str) -> None:
        with self._lock:
            self.fs.rm_file(path)
            self._done(f"DELETE {self._rel(path)}", path, None)

    def rm(self, path: str, recursive: bool = False, **kwargs: Any) -> None:
        # A bulk delete is one DELETE per object, in no promised order: a cut after each.
        with self._lock:
            found = sorted(self.fs.find(path)) if recursive else []
            for key in found:
                self.rm_file(key)
            try:
                self.fs.rm(path, recursive=recursive, **kwargs)  # pseudo-directories; the error for a missing path
            except FileNotFoundError:
                if not found:
                    raise

    def mark(self, label: Any) -> None:
        with self._lock:
            self._log.append((f"(mark {label!r})", label, dict(self._objects)))

    def history(self, cut: int, last: int = 12) -> str:
        lines = [f"  {i + 1:4d} {text}" for i, (text, _, _) in enumerate(self._log[:cut])]
        return "\n".join(lines[-last:])

    def states(self) -> Iterator[CrashState]:
        """The objects after each completed PUT or DELETE (and before the first)."""
        with self._lock:
            log = list(self._log)
        marks: list = []
        yield CrashState(cut=0, marks=(), files={}, how="writer killed before its first request")
        for cut, (text, label, objects) in enumerate(log, 1):
            if label is not None:
                marks.append(label)
                continue
            yield CrashState(cut=cut, marks=tuple(marks), files=dict(objects), how=f"writer killed after {text}")
