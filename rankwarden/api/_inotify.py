"""Wake up when files in some directories change: Linux inotify through ctypes.

``DirWatch`` wakes its caller when something changed in a watched directory
and says which paths (``take``); ``None`` there means "anything may have
changed" (the kernel's event queue overflowed, a watch went away, an event
for a watch whose ``add`` has not returned yet). Readers read each file
named to its end, so a lost event costs latency, never data; callers keep a
slow pass over every file as the safety net. ``DirWatch.open()`` returns None where
inotify is missing (not Linux, no libc symbol, the per-user instance limit
reached): callers fall back to polling.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import struct
import sys

import trio

__all__ = ["IN_CREATE", "IN_MODIFY", "IN_MOVED_TO", "IN_CLOSE_WRITE", "DirWatch"]

IN_MODIFY, IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE = 0x2, 0x8, 0x80, 0x100
_IN_Q_OVERFLOW, _IN_IGNORED = 0x4000, 0x8000
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
log = logging.getLogger(__name__)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


class DirWatch:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.watched: set[str] = set()
        self.failed: str | bool = False  # why a watch could not be added: poll instead
        self._dirs: dict[int, str] = {}  # watch descriptor -> its directory
        #: Paths changed since the last ``take`` (None: anything may have).
        self._changed: set[str] | None = set()

    @classmethod
    def open(cls) -> DirWatch | None:
        if _LIBC is None:
            return None
        fd = _LIBC.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        return cls(fd) if fd >= 0 else None

    def add(self, path: str | os.PathLike[str], mask: int = IN_MODIFY | IN_CLOSE_WRITE | IN_CREATE | IN_MOVED_TO) -> bool:
        """Watch ``path`` (a directory) for changes to the files in it; False if it cannot be watched.

        A path that does not exist (yet) is tried again on the next call; any
        other failure (``ENOSPC``: the per-user watch limit) sets ``failed``,
        and the caller goes back to polling. Thread-safe (one syscall); a path
        already watched costs nothing."""
        key = os.fspath(path)
        if key in self.watched:
            return True
        wd = _LIBC.inotify_add_watch(self.fd, os.fsencode(key), mask) if self.fd >= 0 else -1
        if wd < 0:
            err = ctypes.get_errno() if self.fd >= 0 else errno.EBADF
            if err not in (errno.ENOENT, errno.ENOTDIR) and not self.failed:
                self.failed = os.strerror(err)
                log.warning("cannot watch %s for changes (%s); copying rank output on a poll instead", key, self.failed)
            return False
        self._dirs[wd] = key
        self.watched.add(key)
        return True

    def take(self) -> set[str] | None:
        """The paths changed since the last call, or None if anything may have changed."""
        changed, self._changed = self._changed, set()
        return changed

    async def wait(self, timeout: float) -> bool:
        """Until something changed since the last wait (True), or ``timeout`` seconds (False)."""
        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_readable(self.fd)
            self._drain()
            return True
        return False

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            if not data:
                return
            self._parse(data)

    def _parse(self, data: bytes) -> None:
        offset, size = 0, _EVENT.size
        while offset + size <= len(data):
            wd, mask, _, length = _EVENT.unpack_from(data, offset)
            name = data[offset + size:offset + size + length].rstrip(b"\0")
            offset += size + length
            directory = self._dirs.get(wd)
            if mask & _IN_IGNORED and directory is not None:
                # The directory went away (or was replaced): watch it again when it is back.
                del self._dirs[wd]
                self.watched.discard(directory)
            if mask & (_IN_Q_OVERFLOW | _IN_IGNORED) or directory is None or not name:
                self._changed = None
            elif self._changed is not None:
                self._changed.add(os.path.join(directory, os.fsdecode(name)))

    def close(self) -> None:
        if self.fd >= 0:
            trio.lowlevel.notify_closing(self.fd)
            os.close(self.fd)
            self.fd = -1
