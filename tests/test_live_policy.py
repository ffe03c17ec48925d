"""The coordinator's live-recovery policy under MockClock: fake ranks speak the live messages."""

from __future__ import annotations

import pytest
import trio

from rankwarden import protocol
from rankwarden.events import AttemptStarted, JobState, LiveFallback, LiveReconfiguring, LiveRecovered, RankFailed
from rankwarden.spec import JobSpec

from .test_coordinator_timing import Run, make_spec

pytestmark = pytest.mark.liveness
LIVE_TIMEOUT = 10.0
CRASH_AT = 2.0


def live_spec(tmp_path, **overrides) -> JobSpec:
    return make_spec(tmp_path, live=True, live_timeout=LIVE_TIMEOUT, progress_timeout=0, heartbeat_timeout=100.0,
                     **overrides)


async def next_of(fake, kind):
    """The next message of ``kind`` the coordinator sends this rank."""
    while True:
        for message in fake.received:
            if isinstance(message, kind):
                fake.received.remove(message)
                return message
        await fake.receive()


def behaviour(replacement_rejoins: bool, seen: dict):
    async def rank(fake):
        welcome = await fake.hello()
        fake.received.clear()
        if fake.attempt > 1:  # after a fallback: the group restart just finishes
            await trio.sleep(1)
            await fake.goodbye(0)
            return 0
        if welcome.live_generation:  # the replacement of rank 1
            seen["replacement_welcome"] = welcome
            if not replacement_rejoins:
                await trio.sleep_forever()
            await trio.sleep(0.5)  # joins the new group, receives the state
            await fake.send(protocol.LiveJoined(generation=1, step=7, source=0))
            await fake.heartbeat(step=8)
            await trio.sleep(1)
            await fake.goodbye(0)
            return 0
        await fake.send(protocol.LiveJoined(generation=0, step=-1))
        await fake.heartbeat(step=7)
        if fake.rank == 1:
            await trio.sleep(CRASH_AT)
            return 1  # the failure
        abort = await next_of(fake, protocol.Abort)
        seen["abort_at"] = trio.current_time()
        seen["abort"] = abort
        await trio.sleep(0.1)  # the survivor's collective fails
        await fake.send(protocol.LiveReady(generation=0, step=7, error="RuntimeError: Connection closed by peer"))
        reconfigure = await next_of(fake, protocol.Reconfigure)
        seen["reconfigure"] = reconfigure
        await trio.sleep(0.5)
        await fake.send(protocol.LiveJoined(generation=1, step=7, source=0))
        await fake.heartbeat(step=8)
        await trio.sleep(1)
        await fake.goodbye(0)
        return 0

    return rank


async def test_a_failed_rank_is_replaced_and_the_survivor_told_after_the_verdict(tmp_path, autojump_clock):
    seen: dict = {}
    run = await Run(live_spec(tmp_path), behaviour(True, seen))()
    assert run.snapshot.state == JobState.SUCCEEDED
    [failed_at] = run.times(RankFailed)
    assert failed_at == pytest.approx(CRASH_AT)
    # Verdict first: the survivor hears of it only once the failed rank is gone.
    assert seen["abort_at"] >= failed_at and seen["abort"].generation == 0
    assert run.times(AttemptStarted) == [0.0]  # no group restart
    [reconfiguring] = [e for _, e in run.timeline if isinstance(e, LiveReconfiguring)]
    assert reconfiguring.ranks == [1] and reconfiguring.generation == 1
    # The replacement joins the new group on the new port, with no checkpoint to read.
    assert seen["replacement_welcome"].live_generation == 1
    survivor, failed, replacement = (run.process(0), *[p for p in run.launcher.processes if p.request.rank == 1])
    assert replacement.request.env["MASTER_PORT"] == str(seen["reconfigure"].master_port)
    assert seen["reconfigure"].master_port == reconfiguring.master_port
    assert survivor.request.env["MASTER_PORT"] == failed.request.env["MASTER_PORT"] != str(reconfiguring.master_port)
    assert (seen["reconfigure"].rank, seen["reconfigure"].world_size) == (0, 2)
    [recovered] = [e for _, e in run.timeline if isinstance(e, LiveRecovered)]
    assert (recovered.generation, recovered.source, recovered.step, recovered.ranks) == (1, 0, 7, [1])
    assert recovered.seconds == pytest.approx(0.6)  # 0.1 s to notice + 0.5 s to re-form, in virtual time
    assert run.snapshot.restarts_used == 1


async def test_a_replacement_that_never_rejoins_falls_back_at_live_timeout(tmp_path, autojump_clock):
    seen: dict = {}
    run = await Run(live_spec(tmp_path), behaviour(False, seen))()
    assert run.snapshot.state == JobState.SUCCEEDED
    [(fallback_at, fallback)] = [(t, e) for t, e in run.timeline if isinstance(e, LiveFallback)]
    assert fallback_at == pytest.approx(CRASH_AT + LIVE_TIMEOUT)
    assert fallback.reason == "ranks [1] did not rejoin within live_timeout=10s"
    assert not run.times(LiveRecovered)
    # The group restart: attempt 2 after the backoff, from the agreed checkpoint.
    assert len(run.times(AttemptStarted)) == 2 and run.snapshot.attempt == 2


async def test_no_live_recovery_without_budget(tmp_path, autojump_clock):
    seen: dict = {}
    run = await Run(live_spec(tmp_path, max_restarts=0), behaviour(True, seen))()
    assert run.snapshot.state == JobState.FAILED
    assert not run.times(LiveReconfiguring) and "abort" not in seen


async def test_a_rank_that_never_went_live_means_a_group_restart(tmp_path, autojump_clock):
    async def rank(fake):
        await fake.hello()
        if fake.attempt == 1 and fake.rank == 1:
            await fake.heartbeat(step=1)
            await trio.sleep(CRASH_AT)
            return 1
        if fake.attempt == 1:  # rank 0 trains without rankwarden.worker.live: never announces
            await fake.heartbeat(step=1)
            await trio.sleep_forever()
        await trio.sleep(1)
        await fake.goodbye(0)
        return 0

    run = await Run(live_spec(tmp_path), rank)()
    assert run.snapshot.state == JobState.SUCCEEDED and run.snapshot.attempt == 2
    [fallback] = [e for _, e in run.timeline if isinstance(e, LiveFallback)]
    assert "never started live training" in fallback.reason


def test_live_needs_restart_scope_group():
    from rankwarden.errors import SpecError

    with pytest.raises(SpecError, match="restart_scope 'group'") as info:
        JobSpec.from_dict({"entrypoint": "x.py", "live": True, "restart_scope": "rank"})
    assert info.value.path == "$.live"
