"""A busy rank is not a frozen rank (issue 15, item 7): exact virtual times under MockClock.

Fake ranks report CPU as local processes do (``FakeLocalProcess``): a rank in
``fake.busy(s)`` is inside one long call that holds the GIL (no heartbeats,
one CPU used); ``fake.sigstop()`` is a SIGSTOPped process. The real-process
counterparts are in ``test_busy_processes.py``.
"""

from __future__ import annotations

import pytest
import trio

from rankwarden.events import FailureCause, JobState, RankBusy, RankFailed

from tests.test_coordinator_timing import HB_TIMEOUT, PROGRESS_TIMEOUT, Run, beat, make_spec

pytestmark = pytest.mark.liveness

# Heartbeats at t=1, 2 (steps 1, 2): the heartbeat deadline is 2 + 3 = 5.0,
# the progress deadline 2 + 10 = 12.0; a busy rank is re-judged every 1.0 s
# (heartbeat_interval).
SILENT_FROM = 2.0
HB_DEADLINE = SILENT_FROM + HB_TIMEOUT


def only_rank_1(silent_part):
    """Rank 1 of attempt 1 beats twice, then does ``silent_part``; every other rank is healthy."""

    async def behaviour(fake):
        await fake.hello()
        if fake.rank == 1 and fake.attempt == 1:
            await beat(fake, 2)
            await silent_part(fake)
            await fake.heartbeat(step=3)  # the heartbeat thread gets the GIL back at once
            await beat(fake, 2, first_step=4)
        else:
            await beat(fake, 3)
        await fake.goodbye(0)
        return 0

    return behaviour


async def test_a_rank_busy_in_a_gil_holding_call_is_watched_not_restarted(tmp_path, autojump_clock):
    run = await Run(make_spec(tmp_path), only_rank_1(lambda fake: fake.busy(7.5)))()
    assert run.snapshot.state == JobState.SUCCEEDED and run.snapshot.failures == []
    assert len(run.launches()) == 2  # nothing restarted
    [(at, busy)] = [(t, e) for t, e in run.timeline if isinstance(e, RankBusy)]  # said once, not per check
    assert at == HB_DEADLINE
    assert (busy.rank, busy.attempt, busy.silent_for, busy.cpu_seconds) == (1, 1, HB_TIMEOUT, HB_TIMEOUT)
    assert busy.message == (
        "rank 1 sent no heartbeat for 3.0s but is running (+3.0s CPU): "
        "busy in a call that holds the GIL; still watching"
    )
    # Busy from 2.0 to 9.5, then steps 3 (9.5), 4 (10.5), 5 (11.5) and goodbye.
    assert trio.current_time() == 11.5


async def test_a_busy_rank_gets_no_more_than_progress_timeout(tmp_path, autojump_clock):
    run = await Run(make_spec(tmp_path, max_restarts=0), only_rank_1(lambda fake: fake.busy(60)))()
    [failure] = run.snapshot.failures
    assert failure.cause == FailureCause.PROGRESS_TIMEOUT and failure.rank == 1
    assert run.times(RankFailed) == [SILENT_FROM + PROGRESS_TIMEOUT]
    assert failure.detected_after == PROGRESS_TIMEOUT
    assert "busy in a call that holds the GIL" in failure.message and "it is hung" in failure.message
    assert run.snapshot.state == JobState.FAILED


async def test_busy_before_the_first_step_is_bounded_by_progress_timeout_from_the_last_heartbeat(
    tmp_path, autojump_clock
):
    async def behaviour(fake):
        await fake.hello()  # t=0, then a huge json.load before any step
        if fake.rank == 1:
            await fake.busy(60)
        await beat(fake, 3)
        await fake.goodbye(0)
        return 0

    run = await Run(make_spec(tmp_path, max_restarts=0), behaviour)()
    [failure] = run.snapshot.failures
    assert failure.cause == FailureCause.PROGRESS_TIMEOUT
    assert run.times(RankFailed) == [PROGRESS_TIMEOUT]


async def test_without_progress_timeout_a_busy_rank_runs_as_long_as_it_needs(tmp_path, autojump_clock):
    run = await Run(make_spec(tmp_path, progress_timeout=0.0), only_rank_1(lambda fake: fake.busy(100)))()
    assert run.snapshot.state == JobState.SUCCEEDED and run.snapshot.failures == []
    assert run.times(RankBusy) == [HB_DEADLINE]


async def test_a_stopped_rank_is_frozen_exactly_at_the_timeout(tmp_path, autojump_clock):
    run = await Run(make_spec(tmp_path, max_restarts=0), only_rank_1(lambda fake: fake.sigstop()))()
    [failure] = run.snapshot.failures
    assert failure.cause == FailureCause.HEARTBEAT_TIMEOUT and failure.detected_after == HB_TIMEOUT
    assert run.times(RankFailed) == [HB_DEADLINE]
    assert run.times(RankBusy) == []
    assert "its process is stopped (state T" in failure.message


async def test_a_rank_stopped_while_busy_is_frozen_at_the_next_check(tmp_path, autojump_clock):
    async def silent(fake):
        await fake.busy(4.5)  # 2.0 .. 6.5, then SIGSTOP
        await fake.sigstop()

    run = await Run(make_spec(tmp_path, max_restarts=0), only_rank_1(silent))()
    [failure] = run.snapshot.failures
    # Judged busy at 5.0 and 6.0; stopped at the check at 7.0.
    assert run.times(RankBusy) == [HB_DEADLINE]
    assert run.times(RankFailed) == [7.0]
    assert failure.cause == FailureCause.HEARTBEAT_TIMEOUT and failure.detected_after == 5.0
    assert "stopped (state T" in failure.message


async def test_a_rank_that_deadlocks_after_a_busy_spell_is_frozen_at_the_next_check(tmp_path, autojump_clock):
    async def silent(fake):
        await fake.busy(4.5)  # then asleep forever, using no CPU: a deadlock
        await trio.sleep_forever()

    run = await Run(make_spec(tmp_path, max_restarts=0), only_rank_1(silent))()
    [failure] = run.snapshot.failures
    # Busy at the checks at 5.0, 6.0 and 7.0 (0.5 s of CPU since 6.0); idle since: frozen at 8.0.
    assert run.times(RankFailed) == [8.0]
    assert failure.cause == FailureCause.HEARTBEAT_TIMEOUT
    assert failure.message.endswith("it was busy, but in the 1.0s since the last check it used 0.00s of CPU: it is frozen")


async def test_a_trickle_of_cpu_from_background_threads_is_not_busy(tmp_path, autojump_clock):
    async def silent(fake):  # deadlocked; NCCL's watchdog thread ticks along
        await fake.busy(100, cpu_share=0.1)

    run = await Run(make_spec(tmp_path, max_restarts=0), only_rank_1(silent))()
    [failure] = run.snapshot.failures
    assert run.times(RankFailed) == [HB_DEADLINE]
    assert failure.cause == FailureCause.HEARTBEAT_TIMEOUT and "it used 0.30s of CPU in 3.0s (state R): it is frozen" in failure.message


async def test_a_rank_that_does_not_report_cpu_is_judged_by_the_timeout_alone(tmp_path, autojump_clock):
    run = await Run(make_spec(tmp_path, max_restarts=0), only_rank_1(lambda fake: fake.busy(7.5)), reports_cpu=False)()
    [failure] = run.snapshot.failures
    assert run.times(RankFailed) == [HB_DEADLINE]
    assert failure.cause == FailureCause.HEARTBEAT_TIMEOUT
    assert failure.message.endswith("it is frozen or its host is gone")


async def test_each_busy_spell_is_watched_afresh(tmp_path, autojump_clock):
    async def behaviour(fake):
        await fake.hello()
        for step in range(1, 4):  # each step: a 5 s GIL-holding load, then a heartbeat
            await fake.busy(5)
            await fake.heartbeat(step=step)
        await fake.goodbye(0)
        return 0

    run = await Run(make_spec(tmp_path, world_size=1), behaviour)()
    assert run.snapshot.state == JobState.SUCCEEDED and run.snapshot.failures == []
    assert run.times(RankBusy) == [HB_TIMEOUT]  # reported once per incarnation
    assert trio.current_time() == 15.0
