"""Checksums and the checksummed read of the checkpoint plane.

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

import hashlib
import os
import queue
import threading
import zlib
from typing import Any, Callable

try:  # ISA-L's CRC-32: the same polynomial as zlib's, 2-3x faster; loads are bounded by it
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - isal is a dependency; a platform without its wheel falls back
    _crc32 = zlib.crc32

__all__ = [
    "Checksum", "algorithm_of", "checksum_bytes", "checksum_chunks", "checksum_file", "crc32_combine",
    "read_checksummed", "read_path_checksummed",
]

_CHUNK = 8 << 20


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
