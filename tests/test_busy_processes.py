"""A busy rank is not a frozen rank, with real processes (issue 15, item 7).

A rank that holds the GIL in one C call for 2.5x heartbeat_timeout sends no
heartbeat all that time (the script measures its heartbeat-like thread's
longest gap) and must finish as it would under torchrun; a SIGSTOPped rank
must still be caught at the timeout. Timing logic: ``test_busy_ranks.py``."""

from __future__ import annotations

import json
import os

import pytest
import trio

from rankwarden.coordinator import Coordinator
from rankwarden.events import FailureCause, JobState
from rankwarden.spec import JobSpec

from .conftest import JOB_PREFIX, SCRIPTS
from .test_processes import WORKER

pytestmark = pytest.mark.liveness
LIMIT = 25


async def run(spec: JobSpec):
    coordinator = Coordinator(spec)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(coordinator.run)
            snapshot = await coordinator.wait()
            nursery.cancel_scope.cancel()
    events = [json.loads(line) for line in coordinator.job_dir.events_path.read_text().splitlines()]
    return snapshot, events


async def test_a_rank_holding_the_gil_twice_the_heartbeat_timeout_finishes(tmp_path):
    spec = JobSpec(
        entrypoint=os.path.join(SCRIPTS, "hold_gil.py"), args=["3.5"], world_size=1,
        job_id=f"{JOB_PREFIX}gil", job_dir=str(tmp_path / "job"),
        heartbeat_timeout=1.0, heartbeat_interval=0.1, progress_timeout=20.0, startup_timeout=20.0, max_restarts=0,
    )
    snapshot, events = await run(spec)
    assert snapshot.state == JobState.SUCCEEDED and snapshot.failures == []
    out = (tmp_path / "job" / "attempt_001" / "rank_0.stdout").read_text()
    gap = float(out.split("longest gap another thread saw: ")[1].rstrip("s\n"))
    # The heartbeat thread really was starved, well past the timeout (the hold is
    # calibrated from a probe, so under load it runs shorter or longer than asked).
    assert gap > 1.5 * spec.heartbeat_timeout, out
    [busy] = [e for e in events if e["type"] == "rank_busy"]
    assert busy["rank"] == 0 and busy["silent_for"] >= 1.0 and busy["cpu_seconds"] > 0.25
    assert "busy in a call that holds the GIL; still watching" in busy["message"]


async def test_a_sigstopped_rank_is_still_caught_at_the_timeout(tmp_path):
    record = tmp_path / "record"
    record.mkdir()
    spec = JobSpec(
        entrypoint=WORKER, args=["--record", str(record), "--fail-rank", "1", "--fail-mode", "stop"], world_size=2,
        job_id=f"{JOB_PREFIX}stop", job_dir=str(tmp_path / "job"),
        heartbeat_timeout=1.0, heartbeat_interval=0.1, progress_timeout=5.0, startup_timeout=20.0, max_restarts=0,
        kill_grace=2.0,
    )
    snapshot, events = await run(spec)
    [failure] = snapshot.failures
    assert failure.cause == FailureCause.HEARTBEAT_TIMEOUT and failure.rank == 1
    assert 1.0 <= failure.detected_after < 2.0
    assert "its process is stopped (state T: SIGSTOP or a tracer): it is frozen" in failure.message
    assert not [e for e in events if e["type"] == "rank_busy"]
