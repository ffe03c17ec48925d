"""Heartbeat aggregation: ranks behind a node relay, the real coordinator on the other side.

Under MockClock everything is in memory (fake ranks -> Relay -> Coordinator),
so the times asserted are exact. A hand-written relay peer covers what a
real relay never does (go silent, send garbage). The last tests use real
sockets and real rank processes.
"""

from __future__ import annotations

import os
import signal

import msgspec
import pytest
import trio

from rankwarden import protocol
from rankwarden.agent import Relay
from rankwarden.coordinator import Coordinator
from rankwarden.events import FailureCause, JobState, PeerRejected, RankBusy, RankFailed, RankState
from rankwarden.launcher import ProcessLauncher
from rankwarden.spec import JobSpec
from rankwarden.testing import MemoryListener, open_fake_launcher

from .conftest import JOB_PREFIX, SCRIPTS

pytestmark = pytest.mark.liveness

HB_TIMEOUT = 3.0
TOKEN = "relay-test-token-" + "x" * 32
PID_BASE = 5000  # fake ranks say hello with pid PID_BASE + rank; the relay samples that "process"


def make_spec(tmp_path, **overrides) -> JobSpec:
    data = dict(
        entrypoint="fake.py", world_size=3, job_id="t-relay", job_dir=str(tmp_path / "job"),
        heartbeat_timeout=HB_TIMEOUT, heartbeat_interval=1.0, progress_timeout=10.0, startup_timeout=5.0,
        max_restarts=0, kill_grace=2.0, stop_grace=10.0,
    )
    data.update(overrides)
    return JobSpec.from_dict(data)


class RelayRun:
    """A coordinator over fake ranks that reach it only through one Relay (all in memory)."""

    def __init__(self, spec, behaviour) -> None:
        self.spec = spec
        self.behaviour = behaviour
        self.timeline: list[tuple[float, object]] = []
        self.launcher = None
        self.snapshot = None
        self.upstream_frames = 0

    def _sample(self, pid: int):
        rank = pid - PID_BASE
        live = [p for p in self.launcher.processes if p.request.rank == rank and p.status is None]
        return live[-1].sample() if live else None

    async def __call__(self, during=None):
        coordinator_listener, relay_listener = MemoryListener(), MemoryListener()
        async with open_fake_launcher(self.behaviour, relay_listener) as launcher:
            self.launcher = launcher
            coordinator = Coordinator(self.spec, launcher=launcher, listeners=[coordinator_listener], token=TOKEN)
            self.coordinator = coordinator
            relay = Relay("memory", job=self.spec.job_id, token=TOKEN, heartbeat_interval=1.0,
                          heartbeat_timeout=HB_TIMEOUT, node="n1", connect=coordinator_listener.connect,
                          listeners=[relay_listener], sample=self._sample)
            async with trio.open_nursery() as nursery:
                await nursery.start(coordinator.run)
                nursery.start_soon(self._record, coordinator)
                await nursery.start(relay.serve)
                if during is not None:
                    nursery.start_soon(during, coordinator)
                self.snapshot = await coordinator.wait()
                nursery.cancel_scope.cancel()
        return self

    async def _record(self, coordinator):
        async for event in coordinator.events():
            self.timeline.append((trio.current_time(), event))

    def times(self, kind) -> list[float]:
        return [t for t, e in self.timeline if isinstance(e, kind)]

    def events(self, kind) -> list:
        return [e for _, e in self.timeline if isinstance(e, kind)]


async def hello(fake):
    return await fake.hello(pid=PID_BASE + fake.rank)


async def beat(fake, steps, interval=1.0, first=1):
    for step in range(first, first + steps):
        await trio.sleep(interval)
        await fake.heartbeat(step=step)


async def healthy(fake, steps=4):
    welcome = await hello(fake)
    assert isinstance(welcome, protocol.Welcome)
    await beat(fake, steps)
    await fake.goodbye(0)
    return 0


async def test_ranks_behind_a_relay_run_to_success_with_their_progress(tmp_path, autojump_clock):
    async def behaviour(fake):
        await hello(fake)
        await beat(fake, 4)
        await fake.heartbeat(step=4, loss=0.5)
        await trio.sleep(1.5)  # the next beat carries the metrics
        await fake.goodbye(0)
        return 0

    seen = {}

    async def during(coordinator):
        await trio.sleep(5.2)
        seen.update({r.rank: (r.step, r.metrics, r.heartbeat_age) for r in coordinator.snapshot().ranks})

    run = await RelayRun(make_spec(tmp_path), behaviour)(during)
    assert run.snapshot.state == JobState.SUCCEEDED
    assert run.snapshot.failures == []
    assert [r.state for r in run.snapshot.ranks] == [RankState.SUCCEEDED] * 3
    assert [r.step for r in run.snapshot.ranks] == [4, 4, 4]
    # Progress and metrics travel in the relay's beats; the age is the relay's last frame.
    assert {rank: (step, metrics) for rank, (step, metrics, _) in seen.items()} == {
        r: (4, {"loss": 0.5}) for r in range(3)}
    assert all(age is not None and age <= 1.0 for _, _, age in seen.values())


async def test_a_frozen_rank_behind_a_relay_is_named_with_its_cause_at_the_timeout(tmp_path, autojump_clock):
    last = {}

    async def behaviour(fake):
        if fake.rank == 1:
            await hello(fake)
            await beat(fake, 2, interval=0.7)
            last[1] = trio.current_time()
            await fake.sigstop()
        return await healthy(fake, steps=20)

    run = await RelayRun(make_spec(tmp_path), behaviour)()
    assert run.snapshot.state == JobState.FAILED
    [failure] = run.snapshot.failures
    assert (failure.rank, failure.cause) == (1, FailureCause.HEARTBEAT_TIMEOUT)
    assert failure.detected_after == HB_TIMEOUT
    assert run.times(RankFailed)[0] == last[1] + HB_TIMEOUT  # exactly: the relay's own deadline
    assert "relay on node n1" in failure.message and "stopped (state T" in failure.message


async def test_a_busy_rank_behind_a_relay_is_not_called_frozen_until_it_stops(tmp_path, autojump_clock):
    async def behaviour(fake):
        if fake.rank == 2:
            await hello(fake)
            await beat(fake, 1)
            await fake.busy(2.5 * HB_TIMEOUT)  # a GIL-holding call: silent, one CPU used
            await beat(fake, 2, first=2)  # back: still alive
            last = trio.current_time()
            await fake.busy(1.0)
            await trio.sleep(2.0)
            assert trio.current_time() == last + 3.0
            await fake.busy(100.0, cpu_share=0.01)  # now deadlocked: asleep, a trickle of CPU
        return await healthy(fake, steps=30)

    run = await RelayRun(make_spec(tmp_path, progress_timeout=0), behaviour)()
    [failure] = run.snapshot.failures
    assert (failure.rank, failure.cause) == (2, FailureCause.HEARTBEAT_TIMEOUT)
    # Busy from t=1 to t=8.5 did not fail it; the deadlock did, within one re-judging window.
    assert 8.5 + 3.0 + HB_TIMEOUT - 1.0 <= run.times(RankFailed)[0] <= 8.5 + 3.0 + HB_TIMEOUT + 1.0
    assert "relay on node n1" in failure.message
    # The busy spell is reported once, as for a local rank (rank_busy), by the relay's judgement.
    [busy] = [e for _, e in run.timeline if isinstance(e, RankBusy)]
    assert busy.rank == 2 and busy.cpu_seconds > 0 and "relay on node n1" in busy.message
    assert 1.0 + HB_TIMEOUT <= run.times(RankBusy)[0] < 8.5


async def test_a_rank_that_exits_behind_a_relay_is_reported_by_its_exit(tmp_path, autojump_clock):
    async def behaviour(fake):
        if fake.rank == 0:
            await hello(fake)
            await beat(fake, 2)
            return 3  # exits with code 3, without a goodbye
        return await healthy(fake, steps=20)

    run = await RelayRun(make_spec(tmp_path), behaviour)()
    [failure] = run.snapshot.failures
    assert (failure.rank, failure.cause, failure.exit_code) == (0, FailureCause.EXITED, 3)
    assert run.times(RankFailed) == [2.0]


async def test_a_bad_hello_through_a_relay_rejects_that_rank_only(tmp_path, autojump_clock):
    answers = {}

    async def behaviour(fake):
        if fake.rank == 2 and fake.attempt == 1:
            answers[2] = await fake.hello(pid=PID_BASE + 2, attempt=7)  # the coordinator says no
            return 1
        return await healthy(fake)

    run = await RelayRun(make_spec(tmp_path, max_restarts=1), behaviour)()
    assert isinstance(answers[2], protocol.Reject) and "attempt 7" in answers[2].reason
    [rejected] = run.events(PeerRejected)
    assert rejected.rank == 2 and "/rank 2" in rejected.peer
    assert run.snapshot.state == JobState.SUCCEEDED and run.snapshot.attempt == 2


# -- a hand-written relay: what a real one never does ---------------------------------------------


class FakeRelay:
    def __init__(self, listener: MemoryListener, node="n9") -> None:
        self._listener = listener
        self.node = node
        self.stream = None
        self.decoder = protocol.FrameDecoder(protocol.ToRelay)
        self.received: list = []

    async def open(self, interval=1.0, timeout=HB_TIMEOUT, version=protocol.PROTOCOL_VERSION):
        self.stream = await self._listener.connect()
        await self.send(protocol.RelayHello(version=version, job="t-relay", node=self.node, interval=interval,
                                            timeout=timeout))

    async def send(self, message):
        await self.stream.send_all(protocol.encode(message))

    async def hello(self, rank, token=TOKEN):
        await self.send(protocol.RelayForward(rank=rank, message=protocol.Hello(
            version=protocol.PROTOCOL_VERSION, job="t-relay", rank=rank, attempt=1, pid=1, token=token)))

    async def receive(self):
        while True:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            messages = self.decoder.feed(data)
            if messages:
                self.received.extend(messages)
                return messages


async def _coordinator_with_fake_relay(tmp_path, script, **overrides):
    listener = MemoryListener()
    timeline = []

    async def idle(fake):
        await trio.sleep_forever()

    async with open_fake_launcher(idle, MemoryListener()) as launcher:
        coordinator = Coordinator(make_spec(tmp_path, **overrides), launcher=launcher, listeners=[listener],
                                  token=TOKEN)
        async with trio.open_nursery() as nursery:
            await nursery.start(coordinator.run)

            async def record():
                async for event in coordinator.events():
                    timeline.append((trio.current_time(), event))

            nursery.start_soon(record)
            relay = FakeRelay(listener)
            nursery.start_soon(script, relay, coordinator)
            snapshot = await coordinator.wait()
            nursery.cancel_scope.cancel()
    return snapshot, timeline


async def test_beats_alone_keep_relayed_ranks_alive_and_a_silent_relay_fails_them_all(tmp_path, autojump_clock):
    marks = {}

    async def script(relay, coordinator):
        await relay.open()
        for rank in range(3):
            await relay.hello(rank)
        for seq in range(1, 13):  # 12 s of beats: 4 timeouts with no per-rank heartbeat at all
            await trio.sleep(1.0)
            await relay.send(protocol.RelayBeat(seq=seq, changed=[protocol.RelayRank(0, seq)]))
        marks["last"] = trio.current_time()
        marks["alive"] = [r.state for r in coordinator.snapshot().ranks]
        await trio.sleep_forever()  # the node froze: connection open, nothing sent

    snapshot, timeline = await _coordinator_with_fake_relay(tmp_path, script)
    assert marks["alive"] == [RankState.RUNNING] * 3
    failures = {f.rank: f for f in snapshot.failures}
    assert set(failures) == {0, 1, 2}
    for failure in failures.values():
        assert failure.cause == FailureCause.HEARTBEAT_TIMEOUT and failure.detected_after == HB_TIMEOUT
        assert "relay on node n9 sent nothing for 3.0s" in failure.message
    assert {t for t, e in timeline if isinstance(e, RankFailed)} == {marks["last"] + HB_TIMEOUT}
    assert snapshot.ranks[0].step == 12


async def test_a_relay_that_breaks_the_protocol_is_dropped_and_its_ranks_are_lost(tmp_path, autojump_clock):
    got = {}

    async def script(relay, coordinator):
        await relay.open()
        await relay.hello(0, token="wrong")
        got["wrong"] = await relay.receive()
        await relay.hello(0)
        got["welcome"] = await relay.receive()
        await relay.send(protocol.Heartbeat(seq=1))  # a rank's frame on a relay's connection
        got["end"] = await relay.receive()

    snapshot, timeline = await _coordinator_with_fake_relay(tmp_path, script)
    assert got["wrong"] == [protocol.RelayDeliver(rank=0, message=protocol.Reject(reason="wrong job token")),
                            protocol.RelayDrop(rank=0)]
    [welcome] = got["welcome"]
    assert isinstance(welcome.message, protocol.Welcome)
    assert isinstance(got["end"][0], protocol.Reject) and "heartbeat frame on a relay" in got["end"][0].reason
    reasons = [e.reason for _, e in timeline if isinstance(e, PeerRejected)]
    assert reasons[0] == "wrong job token" and reasons[1].startswith("relay: heartbeat frame")
    [failure] = [f for f in snapshot.failures if f.rank == 0]
    assert failure.cause == FailureCause.CONNECTION_LOST


async def test_a_relay_with_a_bad_hello_is_rejected(tmp_path, autojump_clock):
    got = {}

    async def script(relay, coordinator):
        await relay.open(interval=5.0, timeout=HB_TIMEOUT)
        got["reply"] = await relay.receive()
        relay2 = FakeRelay(relay._listener)
        await relay2.open(version=99)
        got["reply2"] = await relay2.receive()
        coordinator.stop()

    snapshot, timeline = await _coordinator_with_fake_relay(tmp_path, script)
    assert "relay interval 5s must be positive and shorter than its timeout 3s" in got["reply"][0].reason
    assert "version 99" in got["reply2"][0].reason
    assert snapshot.state == JobState.STOPPED


# -- real sockets, real processes ------------------------------------------------------------------


class _ThroughRelay:
    """A ProcessLauncher whose ranks' coordinator is the relay, as the node agent arranges."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay
        self._inner = ProcessLauncher()

    async def start(self, request):
        env = dict(request.env, RANKWARDEN_COORDINATOR=self._relay.address)
        return await self._inner.start(msgspec.structs.replace(request, env=env))

    async def release(self, job_id: str) -> None:  # ReleasesJobs: ends the warm interpreter it keeps
        await self._inner.release(job_id)


@pytest.mark.timeout(90)
async def test_real_ranks_through_a_real_relay_sigstop_is_detected_with_its_cause(tmp_path):
    record = tmp_path / "record"
    record.mkdir()
    spec = JobSpec.from_dict(dict(
        entrypoint=os.path.join(SCRIPTS, "worker.py"), args=["--record", str(record), "--fail-rank", "1",
                                                             "--fail-mode", "stop"],
        world_size=2, job_id=f"{JOB_PREFIX}relay-stop", job_dir=str(tmp_path / "job"), heartbeat_timeout=1.0,
        heartbeat_interval=0.1, progress_timeout=5.0, startup_timeout=30.0, max_restarts=1,
        backoff=dict(initial=0.05, max=0.1), kill_grace=2.0, stop_grace=5.0))
    with trio.fail_after(60):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        relay = Relay(f"127.0.0.1:{port}", job=spec.job_id, token=TOKEN, heartbeat_interval=0.1,
                      heartbeat_timeout=1.0, node="local")
        coordinator = Coordinator(spec, launcher=_ThroughRelay(relay), listeners=listeners, token=TOKEN)
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.serve)  # its connection waits in the backlog until the coordinator accepts
            await nursery.start(coordinator.run)
            snapshot = await coordinator.wait()
            nursery.cancel_scope.cancel()
    assert snapshot.state == JobState.SUCCEEDED and snapshot.attempt == 2
    [failure] = snapshot.failures
    assert (failure.rank, failure.cause) == (1, FailureCause.HEARTBEAT_TIMEOUT)
    assert "relay on node local" in failure.message and "stopped (state T" in failure.message
    assert 1.0 <= failure.detected_after < 2.5
    assert [r.step for r in snapshot.ranks] == [5, 5]  # the last progress arrives before the goodbye


@pytest.mark.timeout(90)
async def test_real_ranks_behind_a_relay_get_their_heartbeats_answered(tmp_path):
    """A rank's Welcome promises answers to its heartbeats; behind a relay the
    relay gives them. Without, every rank stopped itself after heartbeat_timeout
    as if its coordinator were cut off (exit 75), so a job longer than the
    timeout never finished."""
    spec = JobSpec.from_dict(dict(
        entrypoint=os.path.join(SCRIPTS, "worker.py"), args=["--steps", "15", "--step-time", "0.2"],
        world_size=2, job_id=f"{JOB_PREFIX}relay-acks", job_dir=str(tmp_path / "job"), heartbeat_timeout=1.0,
        heartbeat_interval=0.1, progress_timeout=5.0, startup_timeout=30.0, max_restarts=0, stop_grace=5.0))
    with trio.fail_after(60):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        relay = Relay(f"127.0.0.1:{port}", job=spec.job_id, token=TOKEN, heartbeat_interval=0.1,
                      heartbeat_timeout=1.0, node="local")
        coordinator = Coordinator(spec, launcher=_ThroughRelay(relay), listeners=listeners, token=TOKEN)
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.serve)
            await nursery.start(coordinator.run)
            snapshot = await coordinator.wait()
            nursery.cancel_scope.cancel()
    assert snapshot.failures == [] and snapshot.state == JobState.SUCCEEDED and snapshot.attempt == 1
    assert [r.step for r in snapshot.ranks] == [15, 15]


# -- the per-rank path's collector tuning ----------------------------------------------------------


def test_gc_tuning_raises_the_young_threshold_and_freezes_at_powers_of_two():
    import gc

    from rankwarden.coordinator._heartbeat import _GcTuner

    threshold = gc.get_threshold()
    frozen = gc.get_freeze_count()
    try:
        tuner = _GcTuner()
        assert gc.get_threshold()[0] >= _GcTuner.YOUNG_THRESHOLD
        freezes = []
        for n in range(1, 300):
            before = gc.get_freeze_count()
            _ = [[] for _ in range(3)]  # something new to freeze each time
            tuner.connected()
            if gc.get_freeze_count() > before:
                freezes.append(n)
        assert freezes == [64, 128, 256]
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
        if frozen:
            gc.freeze()


async def test_real_sockets_two_relays_several_ranks_one_frozen(tmp_path):
    # Real TCP everywhere (coordinator <- 2 relays <- 4 ranks), fake processes.
    spec = make_spec(tmp_path, world_size=4, heartbeat_timeout=1.0, heartbeat_interval=0.1, progress_timeout=0,
                     startup_timeout=20.0)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    address = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    relays = {node: Relay(address, job=spec.job_id, token=TOKEN, heartbeat_interval=0.1, heartbeat_timeout=1.0,
                          node=node) for node in ("a", "b")}

    async def rank(fake):
        relay = relays["a" if fake.rank < 2 else "b"]
        host, port = relay.address.rsplit(":", 1)
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            decoder = protocol.FrameDecoder(protocol.ToRank)
            await stream.send_all(protocol.encode(protocol.Hello(
                version=protocol.PROTOCOL_VERSION, job=spec.job_id, rank=fake.rank, attempt=1, pid=0, token=TOKEN)))
            [welcome] = decoder.feed(await stream.receive_some(4096))
            assert isinstance(welcome, protocol.Welcome)
            for step in range(1, 16):
                await trio.sleep(0.1)
                await stream.send_all(protocol.encode(protocol.Heartbeat(seq=step, step=step)))
                if fake.rank == 3 and step == 5:
                    await trio.sleep_forever()
            await stream.send_all(protocol.encode(protocol.Goodbye(exit_code=0)))
        return 0

    with trio.fail_after(30):
        async with open_fake_launcher(rank, MemoryListener()) as launcher:
            coordinator = Coordinator(spec, launcher=launcher, listeners=listeners, token=TOKEN)
            async with trio.open_nursery() as nursery:
                for relay in relays.values():
                    await nursery.start(relay.serve)
                await nursery.start(coordinator.run)
                snapshot = await coordinator.wait()
                nursery.cancel_scope.cancel()
    [failure] = snapshot.failures
    assert (failure.rank, failure.cause) == (3, FailureCause.HEARTBEAT_TIMEOUT)
    assert "relay on node b" in failure.message and 1.0 <= failure.detected_after < 1.5
    assert snapshot.state == JobState.FAILED


async def test_a_rank_sending_relay_frames_is_rejected(tmp_path, autojump_clock):
    got = {}

    async def behaviour(fake):
        if fake.rank == 0:
            await fake.hello()
            await fake.send(protocol.RelayBeat(seq=1))
            got["reply"] = await fake.receive()
            return 1
        await fake.hello()
        await trio.sleep_forever()

    listener = MemoryListener()
    async with open_fake_launcher(behaviour, listener) as launcher:
        coordinator = Coordinator(make_spec(tmp_path), launcher=launcher, listeners=[listener], token=TOKEN)
        snapshot = await coordinator.run()
    assert isinstance(got["reply"], protocol.Reject) and got["reply"].reason == "relaybeat frame on a rank's connection"
    assert snapshot.failures[0].rank == 0
