"""No garbage: what crashed writers leave is removed by cleanup (never a committed step or a live
attempt's staging), and destroy removes a job's whole store."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest

from rankwarden.checkpoint import CheckpointStore

from .conftest import SCRIPTS

DIES = os.path.join(SCRIPTS, "ckpt_s3_dies.py")


def _files_under(path):
    return sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names)


def _die_while_saving(url, mode, tmpdir):
    env = dict(os.environ, TMPDIR=str(tmpdir))
    result = subprocess.run([sys.executable, DIES, url, "job", mode], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == -9, result.stdout + result.stderr  # it really died there


def _uploads(store):
    """Incomplete multipart uploads in the store's bucket, straight from the S3 API: (key, upload id)."""
    bucket = store.backend.base.split("/")[0]
    page = store.backend.fs.call_s3("list_multipart_uploads", Bucket=bucket)
    return sorted((u["Key"], u["UploadId"]) for u in page.get("Uploads", []))


def test_a_writer_killed_during_an_s3_save_leaves_no_local_temp_copy(s3_bucket, tmp_path, monkeypatch):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    _die_while_saving(s3_bucket, "in-callable", tmpdir)
    assert _files_under(tmpdir)  # the dead writer's local copy of its payload
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    # A live process's scratch directory (this one's) is not swept.
    with open(f"/proc/{os.getpid()}/stat", "rb") as f:
        started = f.read().rsplit(b")", 1)[1].split()[19].decode()
    alive = tmpdir / "rankwarden-scratch" / f"{socket.gethostname()}.{os.getpid()}.{started}"
    alive.mkdir(parents=True)
    (alive / "payload").write_bytes(b"in use")
    CheckpointStore(s3_bucket, "job").cleanup()
    assert _files_under(tmpdir) == [str(alive / "payload")]


def test_a_writer_killed_mid_upload_leaves_an_upload_that_cleanup_aborts_and_no_local_copy(s3_bucket, tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    _die_while_saving(s3_bucket, "mid-stream", tmpdir)
    assert _files_under(tmpdir) == []  # streamed: no local copy at all
    store = CheckpointStore(s3_bucket, "job")
    assert len(_uploads(store)) == 1  # 5 MiB of it already went up as a part
    removed = store.cleanup()
    assert any(r.endswith("/rank_00000.pt (incomplete upload)") for r in removed)
    assert _uploads(store) == []
    assert store.latest() is None


def test_cleanup_aborts_incomplete_uploads_of_finished_attempts_only(s3_bucket):
    store = CheckpointStore(s3_bucket, "job")
    store.save(1, {"rank_00000.pt": b"x"})
    bucket = s3_bucket[5:]
    started = {}
    for tag in ("dead", "live"):
        key = f"job/step_000000002/{tag}/rank_00000.pt"
        started[tag] = store.backend.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
    other = store.backend.fs.call_s3("create_multipart_upload", Bucket=bucket, Key="other-job/step_000000002/t/f")
    removed = store.cleanup(keep_tags={"live"})
    assert removed == [f"{bucket}/job/step_000000002/dead/rank_00000.pt (incomplete upload)"]
    assert _uploads(store) == sorted([("job/step_000000002/live/rank_00000.pt", started["live"]),
                                      ("other-job/step_000000002/t/f", other["UploadId"])])
    assert store.latest().step == 1


def test_cleanup_removes_every_kind_of_garbage_but_no_step_and_no_live_staging(store):
    store.save(1, {"rank_00000.pt": b"one"})
    store.write_file(2, "rank_00000.pt", b"dead attempt", tag="dead")
    live = store.write_file(2, "rank_00000.pt", b"live attempt", tag="live")
    store.backend.put_lease("step_000000001.00000000dead0000", json.dumps({"expires": 1.0}).encode())  # a killed reader's
    store.backend.put_lease("step_000000001.00000000a1b2c3d4", json.dumps({"expires": 4e9}).encode())  # a live reader's
    if store.backend.atomic_rename:
        with open(store.backend.join("LATEST.tmp-0badf00d"), "wb") as f:
            f.write(b"step_0000")
        os.makedirs(store.backend.join("step_000000000.deleting-0badf00d"))
    removed = store.cleanup(keep_tags={"live"})
    assert removed and all("dead" in path or "0badf00d" in path for path in removed)
    assert store.backend.leases() == ["step_000000001.00000000a1b2c3d4"]
    assert store.backend.garbage(keep_tags={"live"}) == []
    assert store.latest().step == 1
    store.commit(2, [live], tag="live")  # the live attempt's staging was spared
    assert store.load_latest()[1] == {"rank_00000.pt": b"live attempt"}
    assert store.cleanup() == []


def test_destroy_deletes_every_file_of_the_store_and_nothing_of_another_job(store, tmp_path):
    neighbour = CheckpointStore(store.url, "other-job")
    neighbour.save(1, {"rank_00000.pt": b"mine"})
    store.save(1, {"rank_00000.pt": b"x"})
    store.save(2, {"rank_00000.pt": b"y"})
    store.write_file(3, "rank_00000.pt", b"staging", tag="t")
    with store.reading(2):
        store.destroy()
    store.destroy()  # nothing left: still fine
    if store.backend.atomic_rename:
        assert not os.path.exists(store.backend.base)
    else:
        fs = store.backend.fs
        fs.invalidate_cache()
        assert not fs.exists(store.backend.base) or fs.find(store.backend.base) == []
    assert store.latest() is None and store.steps() == [] and store.backend.leases() == []
    assert neighbour.load_latest()[1] == {"rank_00000.pt": b"mine"}
    store.save(1, {"rank_00000.pt": b"again"})  # the job id can be used again
    assert store.load_latest()[1] == {"rank_00000.pt": b"again"}
