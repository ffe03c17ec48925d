"""Multi-rank commit driven by the coordinator, with real processes."""

from __future__ import annotations

import json
import os

import trio

from rankwarden.checkpoint import CheckpointStore
from rankwarden.coordinator import Coordinator
from rankwarden.events import CheckpointCommitted, JobState
from rankwarden.spec import JobSpec

from .conftest import JOB_PREFIX, SCRIPTS

RANK = os.path.join(SCRIPTS, "ckpt_rank.py")


async def run_job(spec):
    coordinator = Coordinator(spec)
    committed = []

    async def watch():
        async for event in coordinator.events():
            if isinstance(event, CheckpointCommitted):
                committed.append((event.attempt, event.step, event.files))

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(coordinator.run)
            nursery.start_soon(watch)
            snapshot = await coordinator.wait()
    return snapshot, committed


def spec_for(tmp_path, url, name, *args, **overrides):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    data = dict(
        entrypoint=RANK, args=["--out", str(out), *args], world_size=3, job_id=f"{JOB_PREFIX}{name}",
        job_dir=str(tmp_path / "job"), checkpoint_url=url, heartbeat_timeout=5.0, max_restarts=1,
        backoff={"initial": 0.05},
    )
    data.update(overrides)
    return JobSpec.from_dict(data)


def resumed(tmp_path, rank, attempt):
    return json.loads((tmp_path / "out" / f"resume_r{rank}_a{attempt}.json").read_text())["resumed_from"]


async def test_a_step_one_rank_never_reported_is_never_committed(tmp_path):
    url = str(tmp_path / "ckpt")
    spec = spec_for(tmp_path, url, "mr-kill", "--steps", "4", "--die-rank", "2", "--die-step", "3")
    snapshot, committed = await run_job(spec)
    assert snapshot.state == JobState.SUCCEEDED and snapshot.attempt == 2
    # Step 3 of attempt 1 had files from all three ranks on disk, but rank 2 never
    # reported it: it was not committed, and attempt 2 resumed from step 2.
    assert committed == [(1, 1, 3), (1, 2, 3), (2, 3, 3), (2, 4, 3)]
    assert [resumed(tmp_path, r, 2) for r in range(3)] == [2, 2, 2]
    assert snapshot.checkpoint_step == 4
    store = CheckpointStore(url, spec.job_id)
    manifest, files = store.load_latest()
    assert manifest.step == 4 and manifest.world_size == 3
    assert files == {f"rank_{r:05d}.pt": f"rank {r} step 4".encode() for r in range(3)}
    assert store.backend.garbage() == []  # attempt 1's step-3 staging was removed
    events = (tmp_path / "job" / "events.jsonl").read_text()
    assert events.count('"type":"checkpoint_committed"') == 4


async def test_multi_rank_commit_on_s3(tmp_path, s3_bucket):
    spec = spec_for(tmp_path, s3_bucket, "mr-s3", "--steps", "2")
    snapshot, committed = await run_job(spec)
    assert snapshot.state == JobState.SUCCEEDED
    assert committed == [(1, 1, 3), (1, 2, 3)]
    manifest, files = CheckpointStore(s3_bucket, spec.job_id).load_latest()
    assert manifest.step == 2 and len(files) == 3


async def test_retention_runs_after_each_commit(tmp_path):
    url = str(tmp_path / "ckpt")
    spec = spec_for(tmp_path, url, "mr-keep", "--steps", "5", keep_checkpoints=2, world_size=2)
    snapshot, committed = await run_job(spec)
    assert snapshot.state == JobState.SUCCEEDED and len(committed) == 5
    assert sorted(CheckpointStore(url, spec.job_id).steps()) == [4, 5]


async def test_a_job_that_ends_leaves_no_uncommitted_staging(tmp_path):
    # Rank 2 writes its step-3 file and dies before reporting it; no restart is
    # left, so the job fails with step 3 staged and never committed. Its staging
    # area is garbage once the job is over, not only when the next attempt starts.
    url = str(tmp_path / "ckpt")
    spec = spec_for(tmp_path, url, "mr-end", "--steps", "4", "--die-rank", "2", "--die-step", "3", max_restarts=0)
    snapshot, committed = await run_job(spec)
    assert snapshot.state == JobState.FAILED
    assert committed == [(1, 1, 3), (1, 2, 3)]
    store = CheckpointStore(url, spec.job_id)
    assert store.steps() == [2, 1]
    assert store.backend.garbage() == []
    assert not list((tmp_path / "ckpt" / spec.job_id).glob("*.tmp-*"))
