"""Coordinator timing logic under MockClock: fake ranks over in-memory streams, exact virtual times."""

from __future__ import annotations

import signal

import pytest
import trio

from rankwarden import protocol
from rankwarden.coordinator import CONNECTION_LOST_GRACE, Coordinator
from rankwarden.events import FailureCause, JobState, PeerRejected, RankFailed, RankState, Restarting
from rankwarden.spec import JobSpec
from rankwarden.testing import MemoryListener, open_fake_launcher

# Every test here is about noticing a failure: a broken detector must fail it
# in seconds (real time) and within the virtual-time bound (tests/conftest.py).
pytestmark = pytest.mark.liveness

HB_TIMEOUT = 3.0
PROGRESS_TIMEOUT = 10.0
STARTUP_TIMEOUT = 5.0
KILL_GRACE = 2.0
STOP_GRACE = 10.0


def make_spec(tmp_path, **overrides) -> JobSpec:
    data = dict(
        entrypoint="fake.py",
        world_size=2,
        job_id="t-fake",
        job_dir=str(tmp_path / "job"),
        heartbeat_timeout=HB_TIMEOUT,
        heartbeat_interval=1.0,
        progress_timeout=PROGRESS_TIMEOUT,
        startup_timeout=STARTUP_TIMEOUT,
        max_restarts=2,
        backoff=dict(initial=1.0, factor=2.0, max=30.0, jitter=0.0),
        kill_grace=KILL_GRACE,
        stop_grace=STOP_GRACE,
    )
    data.update(overrides)
    return JobSpec.from_dict(data)


class Run:
    """Runs a coordinator over fakes and records each event with its virtual time."""

    def __init__(self, spec, behaviour, *, reports_cpu=True) -> None:
        self.spec = spec
        self.behaviour = behaviour
        self.reports_cpu = reports_cpu
        self.timeline: list[tuple[float, object]] = []
        self.coordinator: Coordinator | None = None
        self.launcher = None
        self.snapshot = None

    async def __call__(self, during=None):
        listener = MemoryListener()
        async with open_fake_launcher(self.behaviour, listener, reports_cpu=self.reports_cpu) as launcher:
            self.launcher = launcher
            self.coordinator = coordinator = Coordinator(self.spec, launcher=launcher, listeners=[listener])
            async with trio.open_nursery() as nursery:
                await nursery.start(coordinator.run)
                nursery.start_soon(self._record)
                if during is not None:
                    nursery.start_soon(during, coordinator)
                self.snapshot = await coordinator.wait()
                nursery.cancel_scope.cancel()
        return self

    async def _record(self):
        async for event in self.coordinator.events():
            self.timeline.append((trio.current_time(), event))

    def times(self, kind) -> list[float]:
        return [t for t, e in self.timeline if isinstance(e, kind)]

    def process(self, rank, attempt=1):
        [found] = [p for p in self.launcher.processes if (p.request.rank, p.request.attempt) == (rank, attempt)]
        return found

    def launches(self, rank=None) -> list[float]:
        return [p.started_at for p in self.launcher.processes if rank is None or p.request.rank == rank]


async def beat(fake, steps, interval=1.0, first_step=1):
    for step in range(first_step, first_step + steps):
        await trio.sleep(interval)
        await fake.heartbeat(step=step)


async def healthy(fake, steps=3):
    await fake.hello()
    await beat(fake, steps)
    await fake.goodbye(0)
    return 0


async def test_success_ends_when_last_rank_exits(tmp_path, autojump_clock):
    run = await Run(make_spec(tmp_path), healthy)()
    assert run.snapshot.state == JobState.SUCCEEDED
    assert trio.current_time() == 3.0
    assert run.launches() == [0.0, 0.0]
    assert [r.state for r in run.snapshot.ranks] == [RankState.SUCCEEDED] * 2
    assert [r.step for r in run.snapshot.ranks] == [3, 3]
    assert run.snapshot.failures == []


async def test_frozen_rank_is_caught_exactly_at_heartbeat_timeout(tmp_path, autojump_clock):
    async def behaviour(fake):
        if fake.rank == 1 and fake.attempt == 1:
            await fake.hello()
            await beat(fake, 2)  # heartbeats at t=1, 2
            await trio.sleep_forever()  # frozen: SIGSTOP
        return await healthy(fake, steps=10 if fake.attempt == 1 else 3)

    run = await Run(make_spec(tmp_path), behaviour)()
    [failure] = run.snapshot.failures
    assert failure.cause == FailureCause.HEARTBEAT_TIMEOUT
    assert failure.rank == 1 and failure.attempt == 1
    assert failure.detected_after == HB_TIMEOUT
    assert run.times(RankFailed) == [2.0 + HB_TIMEOUT]
    # Group restart: both ranks of attempt 1 stopped at once, relaunched after backoff 1.0.
    assert run.launches() == [0.0, 0.0, 6.0, 6.0]
    assert all(p.ended_at == 5.0 for p in run.launcher.processes[:2])
    assert run.snapshot.state == JobState.SUCCEEDED and trio.current_time() == 9.0


async def test_hung_rank_is_caught_exactly_at_progress_timeout(tmp_path, autojump_clock):
    async def behaviour(fake):
        if fake.rank == 0 and fake.attempt == 1:
            await fake.hello()
            await beat(fake, 2)  # step 2 at t=2
            while True:  # alive, heartbeating, stuck at step 2
                await trio.sleep(1.0)
                await fake.heartbeat(step=2)
        return await healthy(fake)

    run = await Run(make_spec(tmp_path, max_restarts=0), behaviour)()
    [failure] = run.snapshot.failures
    assert failure.cause == FailureCause.PROGRESS_TIMEOUT
    assert failure.detected_after == PROGRESS_TIMEOUT
    assert run.times(RankFailed) == [2.0 + PROGRESS_TIMEOUT]
    assert "step 2" in failure.message
    assert run.snapshot.state == JobState.FAILED


async def test_progress_is_not_watched_before_the_first_step(tmp_path, autojump_clock):
    async def behaviour(fake):  # an unmodified script: heartbeats, never reports a step
        await fake.hello()
        for _ in range(int(PROGRESS_TIMEOUT * 3)):
            await trio.sleep(1.0)
            await fake.heartbeat()
        await fake.goodbye(0)
        return 0

    run = await Run(make_spec(tmp_path), behaviour)()
    assert run.snapshot.state == JobState.SUCCEEDED
    assert run.snapshot.failures == []


async def test_rank_that_never_says_hello_fails_at_startup_timeout(tmp_path, autojump_clock):
    async def behaviour(fake):
        if fake.rank == 1:
            await trio.sleep_forever()
        return await healthy(fake)

    run = await Run(make_spec(tmp_path, max_restarts=1), behaviour)()
    causes = [(f.cause, f.attempt) for f in run.snapshot.failures]
    assert causes == [(FailureCause.STARTUP_TIMEOUT, 1), (FailureCause.STARTUP_TIMEOUT, 2)]
    # attempt 2 starts at 5 + 1 (backoff) = 6 and fails at 6 + 5.
    assert run.times(RankFailed) == [5.0, 11.0]
    assert run.snapshot.state == JobState.FAILED


async def test_dropped_connection_without_exit_fails_after_grace(tmp_path, autojump_clock):
    async def behaviour(fake):
        if fake.rank == 1:
            await fake.hello()
            await trio.sleep(1.0)
            await fake.close()
            await trio.sleep_forever()
        return await healthy(fake)

    run = await Run(make_spec(tmp_path, max_restarts=0), behaviour)()
    [failure] = run.snapshot.failures
    assert failure.cause == FailureCause.CONNECTION_LOST
    assert run.times(RankFailed) == [1.0 + CONNECTION_LOST_GRACE]


async def test_exit_seen_within_the_grace_wins_over_connection_lost(tmp_path, autojump_clock):
    async def behaviour(fake):
        if fake.rank == 1:
            await fake.hello()
            await trio.sleep(1.0)
            await fake.close()
            await trio.sleep(CONNECTION_LOST_GRACE / 2)
            return 3
        return await healthy(fake)

    run = await Run(make_spec(tmp_path, max_restarts=0), behaviour)()
    [failure] = run.snapshot.failures
    assert (failure.cause, failure.exit_code) == (FailureCause.EXITED, 3)
    assert run.times(RankFailed) == [1.0 + CONNECTION_LOST_GRACE / 2]


async def test_backoff_doubles_up_to_the_cap_and_budget_ends_the_job(tmp_path, autojump_clock):
    async def always_fails(fake):
        await fake.hello()
        await trio.sleep(1.0)
        return 1 if fake.rank == 0 else await trio.sleep_forever()

    spec = make_spec(tmp_path, max_restarts=3, backoff=dict(initial=1.0, factor=2.0, max=3.0, jitter=0.0))
    run = await Run(spec, always_fails)()
    # Fail at +1 each attempt; delays 1, 2, 3 (capped from 4).
    assert run.launches(rank=0) == [0.0, 2.0, 5.0, 9.0]
    assert [e.delay for _, e in run.timeline if isinstance(e, Restarting)] == [1.0, 2.0, 3.0]
    assert run.snapshot.state == JobState.FAILED
    assert trio.current_time() == 10.0
    assert [f.attempt for f in run.snapshot.failures] == [1, 2, 3, 4]
    assert run.snapshot.restarts_used == 3
    report = run.coordinator.failure_report()
    assert "Root cause (first observed failure): attempt 1, rank 0: [exited]" in report
    assert report.index("attempt 1, rank 0") < report.index("attempt 4, rank 0")


async def test_rank_scope_restarts_only_the_failed_rank(tmp_path, autojump_clock):
    async def behaviour(fake):
        if fake.rank == 1 and fake.attempt == 1:
            await fake.hello()
            await trio.sleep(1.0)
            return 1
        return await healthy(fake, steps=5)

    run = await Run(make_spec(tmp_path, restart_scope="rank"), behaviour)()
    assert run.snapshot.state == JobState.SUCCEEDED
    assert run.launches(rank=0) == [0.0]
    assert run.launches(rank=1) == [0.0, 2.0]  # failed at 1, backoff 1
    assert run.process(rank=1, attempt=2).request.env["TORCHELASTIC_RESTART_COUNT"] == "1"
    assert run.process(rank=0).signals == []  # rank 0 was never touched
    assert trio.current_time() == 7.0  # rank 1's second life: 2 + 5 steps


async def test_teardown_kills_a_rank_that_ignores_sigterm_after_kill_grace(tmp_path, autojump_clock):
    async def behaviour(fake):
        if fake.attempt == 1:
            await fake.hello()
            if fake.rank == 1:
                await trio.sleep(1.0)
                return 1
            fake.ignore_sigterm = True
            await beat(fake, 100)
        return await healthy(fake)

    run = await Run(make_spec(tmp_path), behaviour)()
    stubborn = run.process(rank=0)
    assert stubborn.signals == [signal.SIGTERM, signal.SIGKILL]
    assert stubborn.ended_at == 1.0 + KILL_GRACE
    assert stubborn.status.signal == signal.SIGKILL
    assert run.launches() == [0.0, 0.0, 4.0, 4.0]  # 1 + grace 2 + backoff 1


async def test_graceful_stop_drains_ranks_and_ends_stopped(tmp_path, autojump_clock):
    async def behaviour(fake):
        fake.ignore_sigterm = True
        await fake.hello()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(beat, fake, 1000)
            message = await fake.receive()
            assert isinstance(message, protocol.Drain)
            await trio.sleep(0.5)  # "checkpointing"
            nursery.cancel_scope.cancel()
        return 0

    async def stop_at_2(coordinator):
        await trio.sleep(2.0)
        coordinator.stop("test stop")

    run = await Run(make_spec(tmp_path), behaviour)(during=stop_at_2)
    assert run.snapshot.state == JobState.STOPPED
    assert trio.current_time() == 2.5
    assert run.snapshot.failures == []
    assert [r.state for r in run.snapshot.ranks] == [RankState.STOPPED] * 2
    assert all(p.signals == [] for p in run.launcher.processes)  # Drain only: no signal needed


async def test_stop_kills_ranks_that_ignore_it_after_stop_grace(tmp_path, autojump_clock):
    async def behaviour(fake):
        fake.ignore_sigterm = True
        await fake.hello()
        await beat(fake, 1000)
        return 0

    async def stop_at_2(coordinator):
        await trio.sleep(2.0)
        coordinator.stop()

    run = await Run(make_spec(tmp_path), behaviour)(during=stop_at_2)
    assert run.snapshot.state == JobState.STOPPED
    assert [p.ended_at for p in run.launcher.processes] == [2.0 + STOP_GRACE] * 2
    assert all(p.status.signal == signal.SIGKILL for p in run.launcher.processes)


async def test_stop_during_backoff_launches_nothing_more(tmp_path, autojump_clock):
    async def behaviour(fake):
        await fake.hello()
        await trio.sleep(1.0)
        return 1

    async def stop_in_backoff(coordinator):
        await trio.sleep(1.5)  # failure at 1, backoff until 2
        coordinator.stop()

    run = await Run(make_spec(tmp_path), behaviour)(during=stop_in_backoff)
    assert run.snapshot.state == JobState.STOPPED
    assert trio.current_time() == 1.5
    assert len(run.launcher.processes) == 2


async def test_goodbye_without_exit_is_killed_after_heartbeat_timeout_and_counts_as_done(tmp_path, autojump_clock):
    async def behaviour(fake):
        await fake.hello()
        await beat(fake, 1)
        await fake.goodbye(0)
        if fake.rank == 1:
            await trio.sleep_forever()  # e.g. a hang in destroy_process_group at exit
        return 0

    run = await Run(make_spec(tmp_path), behaviour)()
    assert run.snapshot.state == JobState.SUCCEEDED
    assert trio.current_time() == 1.0 + HB_TIMEOUT
    assert run.process(rank=1).status.signal == signal.SIGTERM
    assert run.process(rank=0).status.code == 0


async def test_cancelling_the_coordinator_stops_ranks_and_records_the_end(tmp_path, autojump_clock):
    async def behaviour(fake):
        await fake.hello()
        await beat(fake, 1000)
        return 0

    listener = MemoryListener()
    async with open_fake_launcher(behaviour, listener) as launcher:
        coordinator = Coordinator(make_spec(tmp_path), launcher=launcher, listeners=[listener])
        with trio.move_on_after(2.0):
            await coordinator.run()
    assert coordinator.state == JobState.STOPPED
    assert all(p.status is not None for p in launcher.processes)
    assert (tmp_path / "job" / "result.json").exists()


BAD_PEERS = {
    "wrong token": ("hello", dict(token="nope"), "wrong job token"),
    "wrong job": ("hello", dict(job="other"), "hello for job 'other'"),
    "unknown rank": ("hello", dict(rank=7), "rank 7 is not part of this job"),
    "stale attempt": ("hello", dict(attempt=0), "current attempt is 1"),
    "old protocol": ("hello", dict(version=99), "protocol version 99"),
    "garbage frame": ("raw", b"\x00\x00\x00\x05hello", "undecodable frame"),
    "huge frame": ("raw", b"\xff\xff\xff\xff", "exceeds the limit"),
    "heartbeat first": ("message", protocol.Heartbeat(seq=1), "first frame must be hello"),
}


@pytest.mark.parametrize("case", sorted(BAD_PEERS))
async def test_bad_peer_is_dropped_and_the_job_carries_on(tmp_path, autojump_clock, case):
    kind, payload, reason = BAD_PEERS[case]
    answers = []

    async def behaviour(fake):
        if fake.rank == 0:
            from rankwarden.testing import FakeRank

            intruder = FakeRank(fake.request, fake._listener)
            if kind == "hello":
                answers.append(await intruder.hello(**payload))
            else:
                await (intruder.send_raw(payload) if kind == "raw" else intruder.send(payload))
                answers.append(await intruder.receive())
            await intruder.close()
        return await healthy(fake)

    run = await Run(make_spec(tmp_path), behaviour)()
    assert run.snapshot.state == JobState.SUCCEEDED
    assert run.snapshot.failures == []
    [answer] = answers
    assert isinstance(answer, protocol.Reject) and reason in answer.reason
    rejected = [e for _, e in run.timeline if isinstance(e, PeerRejected)]
    assert len(rejected) == 1 and reason in rejected[0].reason


async def test_second_connection_for_a_connected_rank_is_rejected(tmp_path, autojump_clock):
    answers = []

    async def behaviour(fake):
        await fake.hello()
        if fake.rank == 0:
            from rankwarden.testing import FakeRank

            twin = FakeRank(fake.request, fake._listener)
            answers.append(await twin.hello())
            await twin.close()
        await beat(fake, 2)
        await fake.goodbye(0)
        return 0

    run = await Run(make_spec(tmp_path), behaviour)()
    assert run.snapshot.state == JobState.SUCCEEDED
    assert "already connected" in answers[0].reason


async def test_events_stream_ends_with_the_job_and_matches_events_jsonl(tmp_path, autojump_clock):
    run = await Run(make_spec(tmp_path), healthy)()
    types = [type(e).__name__ for _, e in run.timeline]
    assert types[0] == "JobStarted" and types[-1] == "JobSucceeded"
    lines = (tmp_path / "job" / "events.jsonl").read_text().splitlines()
    assert len(lines) == len(types)
    assert '"type":"job_succeeded"' in lines[-1]


async def test_snapshot_reports_steps_per_second_and_heartbeat_age(tmp_path, autojump_clock):
    async def behaviour(fake):
        await fake.hello()
        await beat(fake, 4, interval=0.5)  # 2 steps/s, last heartbeat at t=2.0
        await trio.sleep(10)
        await fake.goodbye(0)
        return 0

    async def look(coordinator):
        await trio.sleep(2.25)
        snapshot = coordinator.snapshot()
        assert [r.steps_per_second for r in snapshot.ranks] == [2.0, 2.0]
        assert [r.heartbeat_age for r in snapshot.ranks] == [0.25, 0.25]
        assert snapshot.state == JobState.RUNNING

    run = await Run(make_spec(tmp_path, heartbeat_timeout=30.0, heartbeat_interval=0, progress_timeout=0), behaviour)(during=look)
    assert run.snapshot.state == JobState.SUCCEEDED


async def test_a_rank_heartbeating_at_odd_times_is_failed_exactly_timeout_after_its_last(tmp_path, autojump_clock):
    # Heartbeats do not move the deadline (it is re-armed when it fires), so
    # gaps just under the timeout must never fail the rank, and the silence
    # after the last one must fail it at exactly last + timeout.
    gaps = [0.3, 2.9, 0.05, 2.99, 1.7, 0.1, 2.95, 2.999, 0.4, 2.5]
    last = {}

    async def behaviour(fake):
        if fake.rank == 1:
            await fake.hello()
            for step, gap in enumerate(gaps, 1):
                await trio.sleep(gap)
                await fake.heartbeat(step=step)
            last[1] = trio.current_time()
            await trio.sleep_forever()
        return await healthy(fake, steps=30)

    run = await Run(make_spec(tmp_path, max_restarts=0), behaviour)()
    [failure] = run.snapshot.failures
    assert (failure.rank, failure.cause) == (1, FailureCause.HEARTBEAT_TIMEOUT)
    assert run.times(RankFailed) == [last[1] + HB_TIMEOUT]
    assert failure.detected_after == pytest.approx(HB_TIMEOUT)


async def test_the_step_rate_keeps_a_bounded_history(tmp_path, autojump_clock):
    # One (time, step) sample per second at most: at 10 Hz the 30 s window held
    # 300 tuples per rank (3 million at 10,000 ranks).
    seen = {}

    async def behaviour(fake):
        await fake.hello()
        await beat(fake, 400, interval=0.1)
        await fake.goodbye(0)
        return 0

    async def during(coordinator):
        await trio.sleep(35.05)
        seen["rate"] = [r.steps_per_second for r in coordinator.snapshot().ranks]
        seen["history"] = [len(runner._rate) for runner in coordinator._runners.values()]

    run = await Run(make_spec(tmp_path, heartbeat_interval=0.1), behaviour)(during)
    assert run.snapshot.state == JobState.SUCCEEDED
    assert seen["rate"] == [pytest.approx(10.0), pytest.approx(10.0)]
    assert all(n <= 35 for n in seen["history"]), seen["history"]


async def test_heartbeats_are_answered_at_most_four_times_per_timeout_and_never_later(tmp_path, autojump_clock):
    """The coordinator answers heartbeats (a partitioned rank stops itself when
    they go unanswered) but not every one: an answer covers every earlier
    heartbeat, so one per quarter of heartbeat_timeout keeps the rank's oldest
    unanswered heartbeat younger than timeout/4 + one interval, at a fifth of
    the frames here."""
    interval, beats = 0.1, 100
    answered: list[int] = []

    async def behaviour(fake):
        await fake.hello()
        await beat(fake, beats, interval=interval)
        with trio.move_on_after(1.0):
            await fake.receive()  # reads what is queued; acks land in fake.received
        answered.extend(m.seq for m in fake.received if isinstance(m, protocol.HeartbeatAck))
        await fake.goodbye(0)
        return 0

    run = await Run(make_spec(tmp_path, world_size=1, heartbeat_interval=interval), behaviour)()
    assert run.snapshot.state == JobState.SUCCEEDED
    assert answered[0] == 1 and answered == sorted(answered)
    gaps = [b - a for a, b in zip(answered, answered[1:])]
    # Heartbeat k is sent at k * interval: the next answer comes within timeout/4.
    assert max(gaps) * interval <= HB_TIMEOUT / 4 + interval + 1e-9
    assert beats * interval / (HB_TIMEOUT / 4 + interval) <= len(answered) <= beats * interval / (HB_TIMEOUT / 4) + 1
    assert answered[-1] >= beats - HB_TIMEOUT / 4 / interval - 1
