"""The checkpoint store on local disk and memory://: commit, resume, corruption, crashes, full disks."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from rankwarden.checkpoint import FAULT_POINTS, CheckpointStore, FileEntry
from rankwarden.errors import CheckpointError, CorruptCheckpoint, StepAlreadyCommitted

from .conftest import SCRIPTS

WRITER = os.path.join(SCRIPTS, "ckpt_writer.py")


def files(step: int) -> dict[str, bytes]:
    return {"rank_00000.pt": b"a" * 100 + bytes([step]), "rank_00001.pt": b"b" * 50 + bytes([step])}


def test_empty_or_missing_root_means_no_checkpoint(store):
    assert store.latest() is None
    assert store.load_latest() is None
    assert store.steps() == []
    assert store.cleanup() == []


def test_save_commits_a_manifest_and_moves_latest(store):
    manifest = store.save(7, files(7), world_size=2, metadata={"epoch": 1})
    assert manifest.step == 7 and manifest.world_size == 2 and manifest.metadata == {"epoch": 1}
    assert [(f.name, f.size) for f in manifest.files] == [("rank_00000.pt", 101), ("rank_00001.pt", 51)]
    assert all(f.checksum.startswith("crc32:") and len(f.checksum) == 14 for f in manifest.files)
    assert store.backend.read_latest() == b"step_000000007\n"
    found, data = store.load_latest()
    assert found == manifest and data == files(7)


def test_manifests_naming_sha256_still_verify(store):
    from rankwarden.checkpoint._backends import checksum_bytes

    data = b"payload" * 100
    entry = store.write_file(4, "rank_00000.pt", data, tag="t")
    entry = FileEntry(name=entry.name, size=entry.size, checksum=checksum_bytes(data, "sha256"))
    manifest = store.commit(4, [entry], tag="t")
    assert store.read(manifest, "rank_00000.pt") == data
    assert store.latest(checksums=True).step == 4


def test_latest_only_moves_forward(store):
    store.save(20, files(20))
    store.save(10, files(10))
    assert store.backend.read_latest() == b"step_000000020\n"
    assert store.latest().step == 20
    assert store.steps() == [20, 10]


def test_commit_refuses_files_that_are_not_there(store):
    entry = store.write_file(3, "rank_00000.pt", b"x" * 10, tag="t")
    lie = FileEntry(name="rank_00001.pt", size=5, checksum="sha256:00")
    with pytest.raises(CheckpointError, match="rank_00001.pt is missing"):
        store.commit(3, [entry, lie], tag="t")
    wrong = FileEntry(name=entry.name, size=11, checksum=entry.checksum)
    with pytest.raises(CheckpointError, match="is 10 bytes, expected 11"):
        store.commit(3, [wrong], tag="t")
    assert store.latest() is None


def test_a_committed_step_is_never_overwritten_and_the_second_writer_learns_it_lost(store):
    first = store.save(5, files(5))
    with pytest.raises(StepAlreadyCommitted, match="step 5 was already committed by another writer") as lost:
        store.save(5, {"rank_00000.pt": b"other"})
    assert lost.value.manifest == first and isinstance(lost.value, CheckpointError)
    assert store.load_latest() == (first, files(5))


def test_a_damaged_committed_step_is_replaced_by_a_new_save_of_it(store):
    store.save(5, files(5))
    _damage(store, 5, "flipped byte")
    store.save(5, files(50))
    manifest, data = store.load_latest()
    assert manifest.step == 5 and data == files(50)


def test_invalid_names_are_refused(store):
    with pytest.raises(CheckpointError, match="invalid checkpoint file name"):
        store.write_file(1, "../escape", b"x", tag="t")
    with pytest.raises(CheckpointError, match="invalid job name"):
        CheckpointStore("/tmp", "../etc")


def _damage(store, step, how):
    path = store.backend.step_dirs()[step]
    payload_dir = json.loads(store.backend.read(f"{path}/manifest.json")).get("payload_dir")
    target = f"{path}/{payload_dir}/rank_00001.pt" if payload_dir else f"{path}/rank_00001.pt"
    if how == "truncated payload":
        _write(store, target, b"b" * 10)
    elif how == "flipped byte":
        data = bytearray(store.backend.read(target))
        data[3] ^= 0xFF
        _write(store, target, bytes(data))
    elif how == "missing file":
        store.backend.remove(target)
    elif how == "garbage manifest":
        _write(store, f"{path}/manifest.json", b"{not json")
    elif how == "manifest of another step":
        manifest = json.loads(store.backend.read(f"{path}/manifest.json"))
        manifest["step"] = 99
        _write(store, f"{path}/manifest.json", json.dumps(manifest).encode())


def _write(store, path, data):
    if hasattr(store.backend, "fs"):
        store.backend.fs.pipe_file(path, data)
    else:
        with open(path, "wb") as f:
            f.write(data)


@pytest.mark.parametrize(
    "how, log_text",
    [
        ("truncated payload", "rank_00001.pt is 10 bytes, manifest says 51"),
        ("flipped byte", "rank_00001.pt failed its checksum"),
        ("missing file", "rank_00001.pt is missing"),
        ("garbage manifest", "manifest does not parse"),
        ("manifest of another step", "manifest is for job 'job' step 99"),
    ],
)
def test_a_damaged_newest_step_is_skipped_with_a_log_line(store, caplog, how, log_text):
    store.save(1, files(1))
    store.save(2, files(2))
    _damage(store, 2, how)
    with caplog.at_level(logging.WARNING):
        manifest, data = store.load_latest()
    assert manifest.step == 1 and data == files(1)
    assert any(f"skipping step 2: job step 2: {log_text}" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "latest, log_text",
    [
        (b"\x00garbage\xff", "LATEST holds"),
        (b"step_000000009\n", "LATEST names step 9, which does not exist"),
        (b"step_000000001\n", "LATEST names step 1 but step 2 is newer"),
    ],
)
def test_garbage_or_stale_latest_is_a_hint_not_the_truth(store, caplog, latest, log_text):
    store.save(1, files(1))
    store.save(2, files(2))
    _write(store, store.backend.join("LATEST"), latest)
    with caplog.at_level(logging.WARNING):
        assert store.latest().step == 2
    assert any(log_text in r.getMessage() for r in caplog.records)


def test_retention_keeps_the_newest_and_every_nth_and_never_latest_or_a_read(store):
    for step in range(1, 11):
        store.save(step, files(step))
    with store.reading(2):
        deleted = store.retain(3, keep_every=5)
    assert deleted == [1, 3, 4, 6, 7]
    assert sorted(store.steps()) == [2, 5, 8, 9, 10]
    _write(store, store.backend.join("LATEST"), b"step_000000008\n")
    assert store.retain(1) == [2, 5, 9]
    assert sorted(store.steps()) == [8, 10]


def test_retention_never_deletes_the_newest_good_step_behind_a_damaged_one(store):
    store.save(1, files(1))
    store.save(2, files(2))
    _damage(store, 2, "missing file")
    store.retain(1)
    assert store.latest().step == 1


def test_cleanup_removes_what_failed_saves_left_and_nothing_else(store):
    store.save(1, files(1))
    store.write_file(2, "rank_00000.pt", b"partial", tag="dead-attempt")
    removed = store.cleanup()
    assert len(removed) == 1
    assert store.steps() == [1] and store.latest().step == 1
    assert store.cleanup() == []


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_sigkill_at_any_point_of_the_local_commit_never_exposes_a_partial_step(tmp_path, point):
    url = str(tmp_path / "ckpt")
    result = subprocess.run([sys.executable, WRITER, url, "job", point], capture_output=True, text=True, timeout=60)
    assert result.returncode == -9, result.stdout + result.stderr  # it really died there
    reader = CheckpointStore(url, "job")
    reader.cleanup()
    committed = point in ("after_rename", "mid_latest", "after_latest")
    manifest, data = reader.load_latest()
    assert manifest.step == (2 if committed else 1)
    step = manifest.step
    assert data == {n: bytes([step]) * (3 << 20) + n.encode() for n in ("rank_00000.pt", "rank_00001.pt")}
    assert not reader.backend.garbage()  # temp dirs gone
    # A later save still works and moves LATEST past whatever the crash left.
    reader.save(3, {"rank_00000.pt": b"x"})
    assert reader.latest().step == 3 and reader.backend.read_latest() == b"step_000000003\n"


#: The points an object store passes through (no temp dir, no rename, one PUT per object).
OBJECT_POINTS = ("after_payloads", "after_rename", "after_latest")


@pytest.mark.parametrize("point", OBJECT_POINTS)
def test_sigkill_at_any_point_of_the_s3_commit_never_exposes_a_partial_step(s3_bucket, point):
    result = subprocess.run([sys.executable, WRITER, s3_bucket, "job", point], capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stdout + result.stderr
    reader = CheckpointStore(s3_bucket, "job")
    committed = point in ("after_rename", "after_latest")
    manifest, data = reader.load_latest()
    assert manifest.step == (2 if committed else 1)
    step = manifest.step
    assert data == {n: bytes([step]) * (3 << 20) + n.encode() for n in ("rank_00000.pt", "rank_00001.pt")}
    removed = reader.cleanup()
    if committed:
        assert removed == []
    else:  # the dead writer's payloads, under its tag
        assert len(removed) == 1 and removed[0].startswith(f"{s3_bucket[5:]}/job/step_000000002/")
        assert reader.cleanup() == []
    reader.save(3, {"rank_00000.pt": b"x"})
    assert reader.latest().step == 3


def test_s3_manifest_is_written_create_only(s3_bucket):
    store = CheckpointStore(s3_bucket, "job")
    store.save(1, {"rank_00000.pt": b"x"})
    assert store.backend.commit(store.staging_dir(1, "t"), 1, b"{}") is False  # IfNoneMatch refused it
    assert store.latest().step == 1


@pytest.fixture
def tiny_disk(tmp_path):
    """A real filesystem with 1 MiB of space: writes past it fail with ENOSPC."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a 1 MiB tmpfs")
    try:
        yield str(mount)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_during_a_save_is_reported_and_latest_still_names_a_complete_step(tiny_disk):
    store = CheckpointStore(tiny_disk, "job")
    store.save(1, {"rank_00000.pt": b"x" * 1000})
    with pytest.raises(CheckpointError, match="No space left on device"):
        store.save(2, {"rank_00000.pt": b"y" * (2 << 20)})
    assert store.latest().step == 1 and store.backend.read_latest() == b"step_000000001\n"
    assert not store.backend.garbage()  # the failed save cleaned up after itself
    store.save(3, {"rank_00000.pt": b"z" * 1000})  # training goes on; the next save works
    assert store.latest().step == 3


def test_permission_denied_is_reported_clearly(tmp_path):
    root = tmp_path / "ro"
    CheckpointStore(str(root), "job").save(1, {"rank_00000.pt": b"x"})
    # As root, drop to `nobody` (after the interpreter started: it lives under
    # /root); otherwise make the directory read-only. Either way the kernel says EACCES.
    drop = "import os\nos.setgid(65534); os.setuid(65534)\n" if os.geteuid() == 0 else ""
    if not drop:
        os.chmod(root / "job", 0o555)
    code = (
        "import sys\nfrom rankwarden.checkpoint import CheckpointStore\nfrom rankwarden.errors import CheckpointError\n"
        f"s = CheckpointStore({str(root)!r}, 'job')\n" + drop +
        "try:\n    s.save(2, {'rank_00000.pt': b'y'})\nexcept CheckpointError as e:\n    print(e); sys.exit(3)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert "Permission denied" in result.stdout
    assert CheckpointStore(str(root), "job").latest().step == 1
