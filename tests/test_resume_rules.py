"""Whose checkpoint a job may resume: world size and the writer's fingerprint.

The coordinator runs over fake ranks (in memory); the checkpoint store is
real (local disk). A fake rank records the resume step its Welcome names.
"""

from __future__ import annotations

import pytest
import trio

from rankwarden.checkpoint import CheckpointStore, Writer
from rankwarden.coordinator import Coordinator
from rankwarden.events import JobFailedEvent, JobState, ResumeChosen
from rankwarden.spec import JobSpec
from rankwarden.testing import MemoryListener, open_fake_launcher

JOB = "t-rules"


def _spec(tmp_path, **overrides) -> JobSpec:
    data = dict(entrypoint="/srv/train.py", args=["--lr", "0.1"], world_size=2, job_id=JOB,
                job_dir=str(tmp_path / "job"), checkpoint_url=str(tmp_path / "ckpt"), max_restarts=0)
    data.update(overrides)
    return JobSpec.from_dict(data)


def _commit(tmp_path, step: int, *, world_size: int = 2, writer: Writer | None = None) -> None:
    files = {f"rank_{r:05d}.pt": f"rank {r} step {step}".encode() for r in range(world_size)}
    CheckpointStore(str(tmp_path / "ckpt"), JOB).save(step, files, world_size=world_size, writer=writer)


def _writer(**overrides) -> Writer:
    data = dict(entrypoint="/srv/train.py", args=["--lr", "0.1"], world_size=2)
    data.update(overrides)
    return Writer(**data)


async def _run(spec):
    """(snapshot, events, the resume step each launched rank was told)."""
    told = []

    async def rank(fake):
        welcome = await fake.hello()
        told.append((fake.rank, welcome.resume.step))
        await fake.goodbye(0)
        return 0

    listener = MemoryListener()
    with trio.fail_after(20):
        async with open_fake_launcher(rank, listener) as launcher:
            coordinator = Coordinator(spec, launcher=launcher, listeners=[listener])
            snapshot = await coordinator.run()
    return snapshot, coordinator.history(), sorted(told)


async def test_the_same_fingerprint_resumes_and_every_rank_is_told_the_same_step(tmp_path):
    _commit(tmp_path, 4, writer=_writer())
    _commit(tmp_path, 8, writer=_writer())
    snapshot, events, told = await _run(_spec(tmp_path))
    assert snapshot.state == JobState.SUCCEEDED
    assert told == [(0, 8), (1, 8)]
    [chosen] = [e for e in events if isinstance(e, ResumeChosen)]
    assert (chosen.step, chosen.skipped, chosen.message) == (8, [], "resuming from step 8")


async def test_an_empty_store_starts_from_scratch(tmp_path):
    snapshot, events, told = await _run(_spec(tmp_path))
    assert snapshot.state == JobState.SUCCEEDED and told == [(0, None), (1, None)]
    assert [e.message for e in events if isinstance(e, ResumeChosen)] == ["starting from scratch: no committed checkpoint"]


@pytest.mark.parametrize("resume", [False, True])
async def test_a_checkpoint_of_another_world_size_is_refused_naming_both_sizes(tmp_path, resume):
    _commit(tmp_path, 4, world_size=2, writer=_writer(world_size=2))
    snapshot, events, told = await _run(_spec(tmp_path, world_size=3, resume=resume))
    assert snapshot.state == JobState.FAILED
    assert told == []  # no rank started: none on step 4, none on step 0
    [failed] = [e for e in events if isinstance(e, JobFailedEvent)]
    assert "step 4 was written by 2 rank(s), this job has 3" in failed.message


@pytest.mark.parametrize(
    "writer, difference",
    [
        (_writer(args=["--lr", "1.0"]), "args ['--lr', '1.0'] (this job: ['--lr', '0.1'])"),
        (_writer(entrypoint="/srv/other.py"), "entrypoint '/srv/other.py'"),
        (_writer(run_id="job-a"), "run_id 'job-a' (this job: '')"),
        (None, "no fingerprint"),
    ],
    ids=["args", "entrypoint", "run", "legacy"],
)
async def test_another_runs_checkpoint_is_refused_unless_resume_is_asked_for(tmp_path, writer, difference):
    _commit(tmp_path, 4, writer=writer)
    snapshot, events, told = await _run(_spec(tmp_path))
    assert snapshot.state == JobState.FAILED and told == []
    [failed] = [e for e in events if isinstance(e, JobFailedEvent)]
    assert "step 4 was written by another run" in failed.message and difference in failed.message
    assert "--resume" in failed.message

    # Asked for explicitly, it is resumed, and the event says whose it was.
    snapshot, events, told = await _run(_spec(tmp_path, resume=True))
    assert snapshot.state == JobState.SUCCEEDED and told == [(0, 4), (1, 4)]
    [chosen] = [e for e in events if isinstance(e, ResumeChosen)]
    assert "written by another run, resumed as asked" in chosen.message


async def test_an_api_job_reusing_an_old_job_id_does_not_resume_its_training(tmp_path):
    # The REST API gives every submitted job its own run id.
    _commit(tmp_path, 300, writer=_writer(run_id="first"))
    snapshot, _, told = await _run(_spec(tmp_path, run_id="second"))
    assert snapshot.state == JobState.FAILED and told == []
    snapshot, _, told = await _run(_spec(tmp_path, run_id="first"))  # the same job after a server restart
    assert snapshot.state == JobState.SUCCEEDED and told == [(0, 300), (1, 300)]


async def test_the_manifests_a_coordinator_commits_carry_its_fingerprint(tmp_path):
    async def rank(fake):
        from rankwarden import protocol

        await fake.hello()
        store = CheckpointStore(fake.env["RANKWARDEN_CHECKPOINT_URL"], JOB)
        entry = store.write_file(2, f"rank_{fake.rank:05d}.pt", b"state", tag=fake.env["RANKWARDEN_CHECKPOINT_TAG"])
        info = protocol.FileInfo(name=entry.name, size=entry.size, checksum=entry.checksum)
        await fake.send(protocol.CheckpointReady(step=2, files=[info]))
        await fake.goodbye(0)
        return 0

    spec = _spec(tmp_path, run_id="r1")
    listener = MemoryListener()
    with trio.fail_after(20):
        async with open_fake_launcher(rank, listener) as launcher:
            await Coordinator(spec, launcher=launcher, listeners=[listener]).run()
    manifest = CheckpointStore(str(tmp_path / "ckpt"), JOB).verify(2)
    assert manifest.writer == Writer(run_id="r1", entrypoint="/srv/train.py", args=["--lr", "0.1"], world_size=2)


async def test_a_sharded_checkpoint_of_another_world_size_is_resumed_and_says_so(tmp_path):
    # layout "dcp": DCP reshards it on load; the world size is no part of its identity.
    files = {".metadata": b"m", "__0_0.distcp": b"a", "__1_0.distcp": b"b"}
    CheckpointStore(str(tmp_path / "ckpt"), JOB).save(4, files, world_size=2, writer=_writer(world_size=2),
                                                       layout="dcp")
    snapshot, events, told = await _run(_spec(tmp_path, world_size=3))
    assert snapshot.state == JobState.SUCCEEDED and told == [(0, 4), (1, 4), (2, 4)]
    [chosen] = [e for e in events if isinstance(e, ResumeChosen)]
    assert chosen.message == "resuming from step 4 (written by 2 rank(s), resharded on load)"


async def test_a_per_rank_checkpoint_of_another_world_size_says_why_it_cannot_be_resharded(tmp_path):
    _commit(tmp_path, 4, world_size=2, writer=_writer(world_size=2))
    snapshot, events, _ = await _run(_spec(tmp_path, world_size=3))
    [failed] = [e for e in events if isinstance(e, JobFailedEvent)]
    assert "cannot be resharded" in failed.message and "layout 'dcp'" in failed.message
