"""Retention (checksums, commit order, other processes' reading leases) and two writers of one step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from rankwarden.checkpoint import CheckpointStore, set_fault_hook
from rankwarden.errors import CheckpointError, StepAlreadyCommitted

from .conftest import SCRIPTS

READER = os.path.join(SCRIPTS, "ckpt_reader.py")


@pytest.fixture(params=["local", "s3"])
def shared_url(request, tmp_path):
    """A store URL that another process can open too."""
    return str(tmp_path / "ckpt") if request.param == "local" else request.getfixturevalue("s3_bucket")


def files(step: int, fill: bytes = b"a") -> dict[str, bytes]:
    return {"rank_00000.pt": fill * 100 + bytes([step % 256])}


def _flip_a_byte(store, step):
    manifest = store._verify(step, store.backend.step_dirs()[step])
    where = "/".join(filter(None, [store.backend.step_dirs()[step], getattr(manifest, "payload_dir", "")]))
    path = f"{where}/rank_00000.pt"
    data = bytearray(store.backend.read(path))
    data[3] ^= 0xFF
    if hasattr(store.backend, "fs"):
        store.backend.fs.pipe_file(path, bytes(data))
    else:
        with open(path, "wb") as f:
            f.write(data)


def test_retention_protects_the_newest_step_that_verifies_by_checksum_not_by_size(store):
    store.save(1, files(1))
    store.save(2, files(2))
    _flip_a_byte(store, 2)  # same size: only a checksum tells
    store.retain(1)
    assert 1 in store.steps()
    manifest, data = store.load_latest()
    assert manifest.step == 1 and data == files(1)


def test_retention_keeps_the_last_steps_in_commit_order_not_step_order(store):
    # The job committed 10, 20, 30, then was resumed from 20 and committed 24, 28:
    # the last two commits are 24 and 28; 30 stays only because LATEST names it.
    for step in (10, 20, 30, 24, 28):
        store.save(step, files(step))
    assert store.retain(2) == [10, 20]
    assert store.steps() == [30, 28, 24]


def test_commit_order_of_manifests_without_a_sequence_falls_back_on_commit_time(store):
    # Manifests written before commit sequences existed: their commit time orders them.
    for step, created in ((5, 200.0), (6, 300.0), (7, 100.0)):
        store.save(step, files(step))
        path = f"{store.backend.step_dirs()[step]}/manifest.json"
        raw = json.loads(store.backend.read(path))
        raw.pop("commit_seq", None)
        raw["created_at"] = created
        _rewrite(store, path, json.dumps(raw).encode())
    store.save(8, files(8))  # committed after all of them
    assert store.latest().commit_seq > 0
    assert store.retain(2) == [7, 5]  # deleted oldest commit first
    assert store.steps() == [8, 6]


def _rewrite(store, path, data):
    if hasattr(store.backend, "fs"):
        store.backend.fs.rm_file(path)
        store.backend.fs.pipe_file(path, data)
    else:
        with open(path, "wb") as f:
            f.write(data)


class Reader:
    """Another process holding ``store.reading(step)`` until told to stop."""

    def __init__(self, url, step, ttl=None):
        args = [sys.executable, READER, url, "job", str(step)] + ([str(ttl)] if ttl else [])
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = self._line(60)
        if line != b"reading\n":
            self.close()
            pytest.fail(f"the reader did not start: {line!r}")

    def _line(self, timeout):
        timer = threading.Timer(timeout, self.proc.kill)
        timer.start()
        try:
            return self.proc.stdout.readline()
        finally:
            timer.cancel()

    def finish(self):
        self.proc.stdin.close()
        assert self._line(60) == b"done\n"
        assert self.proc.wait(timeout=60) == 0

    def kill(self):
        self.proc.kill()
        self.proc.wait(timeout=60)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=60)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()
        self.proc.stderr.close()


def test_retention_never_deletes_a_step_another_process_is_reading(shared_url):
    store = CheckpointStore(shared_url, "job")
    for step in (1, 2, 3):
        store.save(step, files(step))
    reader = Reader(shared_url, 1)
    try:
        assert store.retain(1) == [2]  # 1 is being read elsewhere
        assert store.steps() == [3, 1]
        reader.finish()  # the read ended: its lease is gone
        assert store.backend.leases() == []
        assert store.retain(1) == [1]
    finally:
        reader.close()


def test_a_stale_lease_of_a_killed_reader_is_ignored_and_cleaned(shared_url):
    store = CheckpointStore(shared_url, "job")
    for step in (1, 2):
        store.save(step, files(step))
    reader = Reader(shared_url, 1, ttl=0.5)
    try:
        reader.kill()  # it never removes its lease
        assert len(store.backend.leases()) == 1
        time.sleep(1.0)  # past the lease's expiry
        assert store.retain(1) == [1]
        assert store.backend.leases() == []
    finally:
        reader.close()


def test_two_writers_of_one_step_on_s3_keep_their_payloads_apart(s3_bucket):
    first = CheckpointStore(s3_bucket, "job")
    second = CheckpointStore(s3_bucket, "job")
    entry_a = first.write_file(5, "rank_00000.pt", b"A" * 64, tag="attempt-a")
    entry_b = second.write_file(5, "rank_00000.pt", b"B" * 64, tag="attempt-b")  # same size, other bytes
    first.write_file(5, "rank_00000.pt", b"C" * 64, tag="attempt-c")  # a third writer that dies before committing
    committed = first.commit(5, [entry_a], tag="attempt-a")
    with pytest.raises(StepAlreadyCommitted, match="step 5 was already committed by another writer") as lost:
        second.commit(5, [entry_b], tag="attempt-b")
    assert lost.value.manifest == committed and committed.payload_dir == "attempt-a"
    manifest, data = CheckpointStore(s3_bucket, "job").load_latest()
    assert manifest == committed and data == {"rank_00000.pt": b"A" * 64}
    step_dir = f"{s3_bucket[5:]}/job/step_000000005"
    assert not first.backend.fs.exists(f"{step_dir}/attempt-b")  # the loser removed its own files
    assert first.cleanup(keep_tags={"attempt-c"}) == []  # still writing: spared
    assert first.cleanup() == [f"{step_dir}/attempt-c"]  # the dead writer's files are garbage
    assert sorted(first.backend.fs.ls(step_dir, detail=False)) == [f"{step_dir}/attempt-a", f"{step_dir}/manifest.json"]
    assert first.load_latest() == (committed, {"rank_00000.pt": b"A" * 64})


def test_a_commit_racing_a_damaged_step_replacement_never_discards_a_committed_step(tmp_path):
    # Step 5 is committed but damaged. Writer A starts replacing it; while A is
    # between its checks and its rename, writer B commits step 5 in full. B was
    # told it committed: that step must be the one on disk, and A must lose.
    url = str(tmp_path / "ckpt")
    CheckpointStore(url, "job").save(5, files(5))
    damaged = CheckpointStore(url, "job")
    _flip_a_byte(damaged, 5)
    a, b = CheckpointStore(url, "job"), CheckpointStore(url, "job")
    entry_a = a.write_file(5, "rank_00000.pt", b"A" * 64, tag="a")
    entry_b = b.write_file(5, "rank_00000.pt", b"B" * 64, tag="b")
    outcome = {}

    def commit(name, store, entry):
        try:
            outcome[name] = store.commit(5, [entry], tag=name)
        except CheckpointError as exc:
            outcome[name] = exc

    racer = threading.Thread(target=commit, args=("b", b, entry_b))

    def hook(point):
        if point == "before_rename" and threading.current_thread() is not racer and not racer.is_alive():
            if "b" not in outcome:
                racer.start()
                racer.join(1.0)  # B may have to wait for A: that is allowed

    set_fault_hook(hook)
    try:
        commit("a", a, entry_a)
        racer.join(30)
    finally:
        set_fault_hook(None)
    assert not racer.is_alive()
    winners = [name for name in "ab" if not isinstance(outcome[name], Exception)]
    losers = [name for name in "ab" if isinstance(outcome[name], StepAlreadyCommitted)]
    assert len(winners) == 1 and len(losers) == 1, outcome
    winner = winners[0]
    manifest, data = CheckpointStore(url, "job").load_latest()
    assert manifest == outcome[winner]
    assert data == {"rank_00000.pt": winner.upper().encode() * 64}


def test_committing_a_step_twice_with_the_same_tag_keeps_the_committed_files(store):
    # A duplicate commit of one attempt's step (a retried report) loses, and
    # must not take the committed step's files with it.
    entry = store.write_file(3, "rank_00000.pt", b"once" * 10, tag="a1")
    committed = store.commit(3, [entry], tag="a1")
    with pytest.raises(StepAlreadyCommitted):
        store.commit(3, [entry], tag="a1")
    assert store.load_latest() == (committed, {"rank_00000.pt": b"once" * 10})
