"""Sharded state (FSDP2 DTensors, DDP through DCP) under the multi-rank commit, with real processes (gloo, CPU).

Each job runs ``scripts/sharded_train.py`` under a coordinator; the ranks save
through ``rankwarden.worker.save(..., per_rank=...)`` and the coordinator
commits. Exact means ``torch.equal`` on every local shard (same world size)
or on the gathered full model (another world size: DCP copies shard bytes,
no arithmetic, so resharding is exact too)."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import trio

from rankwarden.checkpoint import CheckpointStore, dcp_location
from rankwarden.coordinator import Coordinator
from rankwarden.events import CheckpointCommitted, JobState
from rankwarden.spec import JobSpec

from .conftest import JOB_PREFIX, SCRIPTS

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch
SCRIPT = os.path.join(SCRIPTS, "sharded_train.py")


async def run_job(tmp_path, url, name, world, steps, *, tag="run", mode="fsdp", env=None, args=(), **overrides):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    data = dict(
        entrypoint=SCRIPT, args=["--out", str(out), "--mode", mode, *args], world_size=world,
        job_id=f"{JOB_PREFIX}{name}", job_dir=str(tmp_path / f"job-{tag}"), checkpoint_url=url,
        heartbeat_timeout=20.0, max_restarts=0, backoff={"initial": 0.05},
        env={"RW_TEST_STEPS": str(steps), "RW_TEST_TAG": tag, "PYTHONFAULTHANDLER": "1", **(env or {})},
    )
    spec = JobSpec.from_dict({**data, **overrides})
    coordinator = Coordinator(spec)
    committed = []

    async def watch():
        async for event in coordinator.events():
            if isinstance(event, CheckpointCommitted):
                committed.append((event.attempt, event.step))

    with trio.fail_after(150):
        async with trio.open_nursery() as nursery:
            await nursery.start(coordinator.run)
            nursery.start_soon(watch)
            snapshot = await coordinator.wait()
    assert snapshot.state == JobState.SUCCEEDED, (snapshot.failures, _stderr(tmp_path / f"job-{tag}"))
    return snapshot, committed


def _stderr(job_dir):
    return {p.name: p.read_text()[-2000:] for p in job_dir.rglob("*.stderr")}


def log_of(tmp_path, tag, rank, attempt=1):
    lines = (tmp_path / "out" / f"{tag}_log_r{rank}_a{attempt}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def load(tmp_path, name):
    return torch.load(tmp_path / "out" / name, weights_only=True)


def assert_equal_states(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def plain_dcp_load(location, like):
    """What a user without rankwarden does: DCP's own reader on the committed step."""
    import torch.distributed.checkpoint as dcp

    state = {"model": {k: torch.zeros_like(v) for k, v in like.items()}, "step": -1}
    with warnings.catch_warnings():  # DCP always warns that a load without a process group is single-process
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        if "://" in location:
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

            dcp.load(state, storage_reader=FsspecReader(location), no_dist=True)
        else:
            dcp.load(state, checkpoint_id=location, no_dist=True)
    return state


async def check_fsdp_roundtrip(tmp_path, url, name):
    _, committed = await run_job(tmp_path, url, name, 2, 4)
    assert committed == [(1, 2), (1, 4)]
    store = CheckpointStore(url, f"{JOB_PREFIX}{name}")
    manifest = store.verify(4)
    assert manifest.layout == "dcp" and manifest.world_size == 2
    assert {(f.name, f.rank) for f in manifest.files} == {
        (".metadata", 0), ("__0_0.distcp", 0), ("__1_0.distcp", 1), ("rank_00000.pt", 0), ("rank_00001.pt", 1)}
    # A second job at the same size resumes step 4: every local shard is bit-identical.
    await run_job(tmp_path, url, name, 2, 4, tag="again")
    for rank in range(2):
        assert log_of(tmp_path, "again", rank)[0]["resumed_from"] == 4
        assert_equal_states(load(tmp_path, f"run_final_r{rank}.pt"), load(tmp_path, f"again_restored_r{rank}.pt"))
    # Plain DCP reads the committed step (tensors and the step number).
    full = load(tmp_path, "run_final_full.pt")
    state = plain_dcp_load(dcp_location(store, manifest), full)
    assert state["step"] == 4
    assert_equal_states(state["model"], full)


async def test_fsdp_sharded_step_restores_every_local_shard_exactly_and_loads_with_plain_dcp(tmp_path):
    await check_fsdp_roundtrip(tmp_path, str(tmp_path / "ckpt"), "dcp-local")


async def test_fsdp_sharded_step_on_s3(tmp_path, s3_bucket):
    await check_fsdp_roundtrip(tmp_path, f"{s3_bucket}/ckpt", "dcp-s3")


async def test_a_ddp_step_writes_the_replicated_model_once(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    url = str(tmp_path / "ckpt")
    await run_job(tmp_path, url, "dcp-ddp", 2, 2, mode="ddp")
    store = CheckpointStore(url, f"{JOB_PREFIX}dcp-ddp")
    manifest = store.verify(2)
    location = dcp_location(store, manifest)
    metadata = FileSystemReader(location).read_metadata()
    # Every stored item is in exactly one file, and the files hold nothing else:
    # the two replicas' identical tensors were written once between them.
    by_file: dict[str, int] = {}
    for info in metadata.storage_data.values():
        by_file[info.relative_path] = by_file.get(info.relative_path, 0) + info.length
    sizes = {f.name: f.size for f in manifest.files if f.name.endswith(".distcp")}
    assert sizes == {name: by_file.get(name, 0) for name in sizes}
    tensors = [k for k, v in metadata.state_dict_metadata.items() if hasattr(v, "chunks")]
    assert all(len(metadata.state_dict_metadata[k].chunks) == 1 for k in tensors)
    assert sum(sizes.values()) < 2 * max(sizes.values())  # both ranks wrote a part; neither wrote it all twice
    full = load(tmp_path, "run_final_full.pt")
    assert_equal_states(plain_dcp_load(location, full)["model"], full)


async def test_kill_9_mid_sharded_save_leaves_the_previous_step_loadable(tmp_path):
    url = str(tmp_path / "ckpt")
    snapshot, committed = await run_job(tmp_path, url, "dcp-kill", 2, 6, env={"RW_TEST_KILL": "1:4:mid_payload"},
                                        max_restarts=1)
    assert snapshot.attempt == 2
    assert committed == [(1, 2), (2, 4), (2, 6)]
    for rank in range(2):
        assert log_of(tmp_path, "run", rank, attempt=2)[0]["resumed_from"] == 2


@pytest.mark.parametrize("before, after", [(4, 2), (2, 4)])
async def test_resharding_resume_continues_the_loss_and_reads_the_epoch_once(tmp_path, before, after):
    url = str(tmp_path / "ckpt")
    name = f"dcp-{before}to{after}"
    await run_job(tmp_path, url, name, before, 4)
    await run_job(tmp_path, url, name, after, 8, tag="resized")
    # The model resumed at the new size is the one saved at the old (gathered full state, bit for bit).
    assert_equal_states(load(tmp_path, "run_final_full.pt"), load(tmp_path, "resized_restored_full.pt"))
    old = [log_of(tmp_path, "run", r) for r in range(before)]
    new = [log_of(tmp_path, "resized", r) for r in range(after)]
    assert all((log[0]["resumed_from"], log[0]["world"]) == (4, after) for log in new)
    # The loss continues from where it was, not from an untrained model's: on a
    # fixed evaluation batch the resumed model scores what the saved one scored
    # (the same full weights, the same arithmetic on every world size), well
    # below the untrained model's score.
    untrained, saved, resumed = old[0][0]["eval"], old[0][-1]["final_eval"], new[0][0]["eval"]
    assert resumed == saved and saved < untrained / 2, (untrained, saved, resumed)
    assert [line["step"] for line in new[0][1:-1]] == [5, 6, 7, 8]
    # Epoch 0 (48 records) is read exactly once across both world sizes.
    ids = [i for log in old + new for line in log[1:-1] if line["epoch"] == 0 for i in line["ids"]]
    assert sorted(ids) == sorted(s * 100 + i for s in range(8) for i in range(6))


async def test_async_sharded_save_writes_the_state_of_the_moment_it_was_called(tmp_path):
    # Saved at step 4 in the background while steps 5 and 6 train (FSDP2 updates
    # the shards in place): the step holds the shards as they were at step 4.
    url = str(tmp_path / "ckpt")
    _, committed = await run_job(tmp_path, url, "dcp-async", 2, 6, env={}, args=["--background", "--every", "4"])
    assert committed == [(1, 4)]
    await run_job(tmp_path, url, "dcp-async", 2, 6, tag="again", args=["--background", "--every", "4"])
    for rank in range(2):
        saved, restored = load(tmp_path, f"run_saved4_r{rank}.pt"), load(tmp_path, f"again_restored_r{rank}.pt")
        assert_equal_states(saved, restored)
        assert not all(torch.equal(saved[k], v) for k, v in load(tmp_path, f"run_final_r{rank}.pt").items())


def test_under_plain_torchrun_the_ranks_commit_sharded_steps_and_reshard_2_to_3(tmp_path):
    # No coordinator: rank 0 commits after gathering every rank's entries, and
    # chooses the resume step for all (broadcast), a sharded step of another size included.
    import subprocess
    import sys

    url, out = tmp_path / "ckpt", tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RANKWARDEN_") or k == "RANKWARDEN_TEST_SESSION"}

    def torchrun(world, steps, tag):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
                   SCRIPT, "--out", str(out), "--url", str(url)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=240,
                                env={**env, "RW_TEST_STEPS": str(steps), "RW_TEST_TAG": tag, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]

    torchrun(2, 4, "run")
    manifest = CheckpointStore(str(url), "default").latest()
    assert (manifest.step, manifest.world_size, manifest.layout) == (4, 2, "dcp")
    torchrun(3, 6, "resized")
    assert all(log_of(tmp_path, "resized", r)[0]["resumed_from"] == 4 for r in range(3))
    assert_equal_states(load(tmp_path, "run_final_full.pt"), load(tmp_path, "resized_restored_full.pt"))
    assert CheckpointStore(str(url), "default").latest().world_size == 3
