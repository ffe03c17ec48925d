"""A torchrun DDP script (gloo, CPU) runs unchanged under rankwarden and survives kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import trio

from rankwarden.coordinator import Coordinator
from rankwarden.events import FailureCause, JobState, RankConnected
from rankwarden.spec import JobSpec

from .conftest import JOB_PREFIX, SCRIPTS

pytest.importorskip("torch")
pytestmark = pytest.mark.torch
SCRIPT = os.path.join(SCRIPTS, "ddp_torchrun.py")


async def test_torchrun_ddp_script_runs_unchanged_and_recovers_from_kill_9(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    spec = JobSpec(
        entrypoint=SCRIPT, args=["--steps", "300", "--ckpt", str(ckpt)], world_size=2, job_id=f"{JOB_PREFIX}ddp",
        job_dir=str(tmp_path / "job"), heartbeat_timeout=10.0, max_restarts=2, backoff={"initial": 0.1},
    )
    coordinator = Coordinator(spec)
    killed = []

    async def kill_rank_1_once_both_connected():
        connected = set()
        async for event in coordinator.events():
            if isinstance(event, RankConnected) and event.attempt == 1:
                connected.add(event.rank)
                if connected == {0, 1}:
                    break
        # Let it train a little so there is a checkpoint to resume from.
        with trio.fail_after(120):
            while not ckpt.exists():
                await trio.sleep(0.05)
        pid = coordinator.snapshot().ranks[1].pid
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            await nursery.start(coordinator.run)
            nursery.start_soon(kill_rank_1_once_both_connected)
            snapshot = await coordinator.wait()
    assert killed
    assert snapshot.state == JobState.SUCCEEDED and snapshot.attempt == 2
    [failure] = snapshot.failures
    assert (failure.rank, failure.cause, failure.signal) == (1, FailureCause.SIGNALED, signal.SIGKILL)
    resumed = (tmp_path / "job" / "attempt_002" / "rank_0.stdout").read_text()
    assert "restart=1 starting at step" in resumed and "starting at step 0" not in resumed
    assert "rank 0 finished at step 300" in resumed


def test_the_same_script_runs_under_plain_torchrun(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run([*torchrun, SCRIPT, "--steps", "10", "--ckpt", str(tmp_path / "c.pt")],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rank 0 finished at step 10" in result.stdout
