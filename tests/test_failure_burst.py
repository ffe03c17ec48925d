"""Many ranks failing at the same instant (a frozen node behind a relay, a
switch that drops a rack): each is failed at exactly its deadline, and the
failure path reads no file for a rank that cannot be a configuration
error (MockClock, exact times)."""

from __future__ import annotations

import pytest
import trio

from rankwarden.coordinator._jobdir import JobDir
from rankwarden.events import FailureCause, RankFailed

from .test_coordinator_timing import HB_TIMEOUT, Run, make_spec

RANKS = 200


@pytest.fixture
def stderr_reads(monkeypatch):
    """Every read of a rank's stderr tail, as (rank, attempt)."""
    reads: list[tuple[int, int]] = []
    original = JobDir.stderr_tail

    def counting(self, rank, attempt, lines=10):
        reads.append((rank, attempt))
        return original(self, rank, attempt, lines)

    monkeypatch.setattr(JobDir, "stderr_tail", counting)
    return reads


async def test_ranks_failing_at_the_same_instant_are_each_failed_at_their_deadline(tmp_path, autojump_clock,
                                                                                   stderr_reads):
    # Half the ranks freeze after their heartbeat at t=1 (deadline 1 + HB_TIMEOUT),
    # the other half exit before their first step at that same instant.
    async def behaviour(fake):
        if fake.attempt > 1:
            await trio.sleep_forever()  # relaunched: stays up until the job is stopped
        await fake.hello()
        await trio.sleep(1.0)
        await fake.heartbeat(step=None)
        if fake.rank % 2:
            await trio.sleep(HB_TIMEOUT - 1.0)
            await fake.heartbeat(step=None)
            await trio.sleep(1.0)
            with open(fake.request.stderr_path, "a") as f:
                f.write(f"rank {fake.rank} cannot open its data\n")
            return 1
        await trio.sleep_forever()  # frozen

    async def stop_later(coordinator):
        await trio.sleep(1.0 + HB_TIMEOUT + 1.5)  # after the relaunches, before their startup_timeout
        coordinator.stop(force=True)

    spec = make_spec(tmp_path, world_size=RANKS, restart_scope="rank", max_restarts=RANKS, progress_timeout=0,
                     backoff=dict(initial=1.0, factor=1.0, max=1.0, jitter=0.0))
    run = await Run(spec, behaviour)(stop_later)
    failed = [(t, e) for t, e in run.timeline if isinstance(e, RankFailed)]
    assert len(failed) == RANKS
    assert {t for t, _ in failed} == {1.0 + HB_TIMEOUT}
    frozen = [e for _, e in failed if e.failure.cause == FailureCause.HEARTBEAT_TIMEOUT]
    assert sorted(e.rank for e in frozen) == list(range(0, RANKS, 2))
    assert all(e.failure.detected_after == HB_TIMEOUT for e in frozen)
    # Every rank was relaunched once, after the 1 s backoff (no failure waited on another's).
    assert sorted(run.launches())[RANKS:] == [1.0 + HB_TIMEOUT + 1.0] * RANKS
    # stderr is read only where it can matter (an exit before the first step),
    # once per rank: the frozen half failed without touching a file.
    assert sorted(r for r, _ in stderr_reads) == list(range(1, RANKS, 2))
