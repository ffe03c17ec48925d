"""The read path: one buffer, checksummed while it is read, verified before it is returned."""

from __future__ import annotations

import ctypes
import io
import os
import tracemalloc
import uuid

import pytest

torch = pytest.importorskip("torch")

from rankwarden.checkpoint import CheckpointStore, load_torch, torch_payload  # noqa: E402
from rankwarden.checkpoint import _checksum as _backends  # noqa: E402
from rankwarden.checkpoint._backends import checksum_bytes  # noqa: E402
from rankwarden.errors import CorruptCheckpoint  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(params=["local", "memory", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return CheckpointStore(str(tmp_path), "job")
    if request.param == "s3":
        return CheckpointStore(request.getfixturevalue("s3_bucket"), "job")
    return CheckpointStore(f"memory://rankwarden-read-{uuid.uuid4().hex}", "job")


def _state(mib: int = 4) -> dict:
    gen = torch.Generator().manual_seed(0)
    numel = (mib << 20) // 4 // 4
    return {f"w{i}": torch.randn(numel, generator=gen) for i in range(4)} | {"step": torch.tensor(7), "odd": torch.ones(3, 5)}


def _address(buffer: bytearray) -> int:
    return ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))


def test_read_returns_the_verified_bytes_and_tensors_are_views_of_them(store):
    state = _state()
    manifest = store.save(1, {"r.pt": torch_payload(state)})
    data = store.read(manifest, "r.pt")
    assert isinstance(data, bytearray) and len(data) == manifest.file("r.pt").size
    assert checksum_bytes(data) == manifest.file("r.pt").checksum
    loaded = load_torch(data)
    start, end = _address(data), _address(data) + len(data)
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor)
        assert start <= loaded[key].data_ptr() < end  # a view: no copy was made
    del data  # the tensors keep the buffer alive
    assert torch.equal(loaded["w3"], state["w3"])


def test_reading_and_loading_needs_one_buffer_not_two(tmp_path):
    # Before: bytes from f.read() and then a bytearray copy per tensor: 2x the file at peak.
    store = CheckpointStore(str(tmp_path), "job")
    manifest = store.save(1, {"r.pt": torch_payload(_state(32))})
    size = manifest.file("r.pt").size
    tracemalloc.start()
    try:
        loaded = load_torch(store.read(manifest, "r.pt"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 1.1 * size, f"peak {peak} bytes for a {size}-byte file"
    assert loaded["w0"].numel() == (32 << 20) // 16


@pytest.mark.parametrize("damage", ["flip", "truncate", "append"])
def test_damaged_files_are_never_returned(store, damage):
    manifest = store.save(1, {"r.pt": torch_payload(_state(1))})
    path = store._file_path(store.backend.step_dirs()[1], store.verify(1, checksums=False), "r.pt")
    data = bytearray(store.backend.read(path))
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        del data[-1]
    else:
        data += b"\0"
    if hasattr(store.backend, "fs"):
        store.backend.fs.pipe_file(path, bytes(data))
    else:
        with open(path, "wb") as f:
            f.write(data)
    with pytest.raises(CorruptCheckpoint, match="r.pt failed its checksum"):
        store.read(manifest, "r.pt")


class _Trickle(io.RawIOBase):
    """A file that returns at most ``step`` bytes per read, like a socket or a slow network file."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data, self._pos, self._step = data, 0, step

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self._step, len(self._data) - self._pos)
        b[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


@pytest.mark.parametrize(("size", "expect_exact"), [(100_003, True), (100_004, False), (99_000, False)])
def test_read_checksummed_handles_short_reads_and_wrong_lengths(monkeypatch, size, expect_exact):
    monkeypatch.setattr(_backends, "_CHUNK", 4096)
    content = os.urandom(100_003)
    data, checksum, exact = _backends.read_checksummed(_Trickle(content, 1000), size)
    assert exact is expect_exact
    assert bytes(data) == content[:size]
    assert checksum == checksum_bytes(content[:size])


@pytest.mark.parametrize(("size", "expect_exact"), [(100_003, True), (100_004, False), (99_000, False)])
def test_local_files_are_read_in_two_checksummed_halves(monkeypatch, tmp_path, size, expect_exact):
    monkeypatch.setattr(_backends, "_SPLIT_CHUNK", 4096)  # 100 kB is then split, as a big file is
    content = os.urandom(100_003)
    (tmp_path / "f").write_bytes(content)
    data, checksum, exact = _backends.read_path_checksummed(str(tmp_path / "f"), size)
    assert exact is expect_exact
    if exact:
        assert data == content and checksum == checksum_bytes(content)


def test_crc32_combine_matches_zlib():
    import random
    import zlib

    rng = random.Random(0)
    for length1, length2 in [(0, 0), (0, 5), (5, 0), (1, 1), (1000, 12345), (3, 1 << 20), (rng.randrange(1 << 16), 77)]:
        a, b = rng.randbytes(length1), rng.randbytes(length2)
        assert _backends.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
