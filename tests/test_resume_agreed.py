"""One resume step for every rank, chosen by the coordinator: real DDP processes, local disk and S3.

Two ranks commit steps 4, 8 and 12; one byte of rank 1's step-12 file is then
flipped (same size). Rerun: both ranks must resume from step 8, the replicas
must end bit-identical, and the event log must say why step 12 was skipped.
Before agreed resume, rank 0 resumed from 12 and rank 1 from 8, and the job
still "succeeded" with diverged replicas.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import trio

from rankwarden.checkpoint import CheckpointStore
from rankwarden.coordinator import Coordinator
from rankwarden.events import CheckpointCommitted, JobState, ResumeChosen
from rankwarden.spec import JobSpec

from .conftest import JOB_PREFIX, SCRIPTS

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch
SCRIPT = os.path.join(SCRIPTS, "ddp_resume.py")


async def _run(spec: JobSpec) -> tuple[JobState, list]:
    coordinator = Coordinator(spec)
    with trio.fail_after(180):
        async with trio.open_nursery() as nursery:
            await nursery.start(coordinator.run)
            snapshot = await coordinator.wait()
    events = coordinator.history()
    return snapshot, events


def _spec(tmp_path, url, name, steps, *extra, tag="run") -> JobSpec:
    return JobSpec(
        env={"RW_TEST_TAG": tag},
        entrypoint=SCRIPT, args=["--steps", str(steps), "--out", str(tmp_path), *extra], world_size=2,
        job_id=f"{JOB_PREFIX}{name}", job_dir=str(tmp_path / "job"), checkpoint_url=url,
        heartbeat_timeout=20.0, max_restarts=0,
    )


def _flip_a_byte(store: CheckpointStore, step: int, name: str) -> None:
    manifest = store.verify(step, checksums=False)
    path = store._file_path(store.backend.step_dirs()[step], manifest, name)  # on S3: under the writer's tag
    data = bytearray(store.backend.read(path))
    data[len(data) // 2] ^= 0x01
    if hasattr(store.backend, "fs"):
        store.backend.fs.pipe_file(path, bytes(data))
    else:
        with open(path, "r+b") as f:
            f.write(data)


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("wait", [True, False], ids=["wait", "no-wait"])
async def test_a_damaged_file_of_one_rank_moves_every_rank_back_to_the_same_step(tmp_path, request, where, wait):
    url = str(tmp_path / "ckpt") if where == "local" else request.getfixturevalue("s3_bucket")
    name = f"agreed-{where}-{'w' if wait else 'nw'}"
    extra = [] if wait else ["--no-wait"]
    # The same command both times: the second run resumes the first (same fingerprint).
    first, events = await _run(_spec(tmp_path, url, name, 12, *extra))
    assert first.state == JobState.SUCCEEDED, first.failures
    assert [e.step for e in events if isinstance(e, CheckpointCommitted)] == [4, 8, 12]

    store = CheckpointStore(url, f"{JOB_PREFIX}{name}")
    _flip_a_byte(store, 12, "rank_00001.pt")
    assert store.verify(12, checksums=False).step == 12  # same size: only a checksum can tell

    second, events = await _run(_spec(tmp_path, url, name, 12, *extra, tag="again"))
    assert second.state == JobState.SUCCEEDED, second.failures
    [chosen] = [e for e in events if isinstance(e, ResumeChosen)]
    assert chosen.step == 8
    assert [(s.step, s.reason) for s in chosen.skipped] == [(12, "rank 1's file rank_00001.pt failed its checksum")]
    assert chosen.message == "resuming from step 8 (step 12 skipped: rank 1's file rank_00001.pt failed its checksum)"
    lines = (tmp_path / "job" / "events.jsonl").read_text().splitlines()
    assert any(json.loads(line).get("message") == chosen.message for line in lines)

    resumed = [json.loads((tmp_path / f"again_resume_r{r}.json").read_text())["resumed_from"] for r in (0, 1)]
    assert resumed == [8, 8]
    finals = [torch.load(tmp_path / f"again_final_r{r}.pt", weights_only=True) for r in (0, 1)]
    assert finals[0].keys() == finals[1].keys()
    for key in finals[0]:
        assert torch.equal(finals[0][key], finals[1][key]), f"replicas differ in {key}"
    # ... and they equal the first run's: steps 9-12 were trained again exactly.
    reference = torch.load(tmp_path / "run_final_r0.pt", weights_only=True)
    assert all(torch.equal(reference[k], finals[0][k]) for k in reference)
    # Step 12 was committed again, intact this time.
    assert [e.step for e in events if isinstance(e, CheckpointCommitted)] == [12]
    assert store.verify(12).step == 12


def test_under_plain_torchrun_rank_0_chooses_the_step_for_every_rank(tmp_path):
    url = str(tmp_path / "ckpt")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command = [*torchrun, SCRIPT, "--steps", "12", "--out", str(tmp_path), "--url", url]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RANKWARDEN_") or k == "RANKWARDEN_TEST_SESSION"}
    first = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    store = CheckpointStore(url, "default")
    assert store.steps() == [12, 8, 4]
    _flip_a_byte(store, 12, "rank_00001.pt")

    again = subprocess.run(command, capture_output=True, text=True, timeout=180, env={**env, "RW_TEST_TAG": "again"})
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = [json.loads((tmp_path / f"again_resume_r{r}.json").read_text())["resumed_from"] for r in (0, 1)]
    assert resumed == [8, 8]
    finals = [torch.load(tmp_path / f"again_final_r{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
