"""AgentLauncher's membership and deadlines with fake agents over memory streams, under MockClock.

No process, no socket: each fake agent is the far end of a memory stream
pair handed to the launcher's connection handler, speaking the agent_*
messages of rankwarden.protocol. Virtual times are asserted exactly. The
last tests run the real agent (``run_agent``) against the launcher on loopback.
"""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from rankwarden import protocol
from rankwarden.agent import AgentConfig, run_agent
from rankwarden.errors import LaunchError
from rankwarden.launcher import AgentLauncher, CpuSample, ExitStatus, LaunchRequest
from rankwarden.launcher._agent import NODE_LOST

pytestmark = pytest.mark.liveness

TOKEN = "s" * 32
HB_TIMEOUT = 4.0
JOIN_TIMEOUT = 30.0


def make_launcher(nnodes=2, nproc=2) -> AgentLauncher:
    return AgentLauncher(job_id="t-job", nnodes=nnodes, nproc=nproc, token=TOKEN, heartbeat_timeout=HB_TIMEOUT,
                         heartbeat_interval=1.0, join_timeout=JOIN_TIMEOUT)


def request(rank: int, attempt: int = 1, tmp_path=None, **env: str) -> LaunchRequest:
    out = str(tmp_path / f"r{rank}.out") if tmp_path else ""
    err = str(tmp_path / f"r{rank}.err") if tmp_path else ""
    return LaunchRequest(job_id="t-job", rank=rank, local_rank=rank, attempt=attempt, argv=["python", "x.py"],
                         env={"RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                              "RANKWARDEN_COORDINATOR_PID": "1", **env},
                         stdout_path=out, stderr_path=err)


class FakeAgent:
    def __init__(self, stream) -> None:
        self.stream = stream
        self.decoder = protocol.FrameDecoder(protocol.ToAgent)
        self.pending: list = []

    async def send(self, message) -> None:
        await self.stream.send_all(protocol.encode(message))

    async def hello(self, node_rank=1, nproc=2, token=TOKEN, address="") -> None:
        await self.send(protocol.AgentHello(version=protocol.PROTOCOL_VERSION, token=token, node_rank=node_rank,
                                            nproc=nproc, host=f"host{node_rank}", pid=100 + node_rank,
                                            address=address))

    async def receive(self):
        while not self.pending:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.pending = self.decoder.feed(data)
        return self.pending.pop(0)

    async def receive_kind(self, kind):
        while True:
            message = await self.receive()
            if message is None or isinstance(message, kind):
                return message


async def connect(nursery, launcher: AgentLauncher, node_rank=1, **hello) -> FakeAgent:
    ours, theirs = trio.testing.memory_stream_pair()
    nursery.start_soon(launcher._handle, theirs)
    agent = FakeAgent(ours)
    await agent.hello(node_rank=node_rank, **hello)
    return agent


async def test_an_agent_joins_and_the_rank_gets_torchruns_multi_node_env_and_its_exact_exit(tmp_path, monkeypatch):
    monkeypatch.setenv("INHERITED_ONLY", "x")
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    launcher = make_launcher()
    async with trio.open_nursery() as nursery:
        node0 = await connect(nursery, launcher, node_rank=0, address="10.0.0.1")
        node1 = await connect(nursery, launcher, node_rank=1)
        assert isinstance(await node0.receive(), protocol.AgentWelcome)
        welcome = await node1.receive()
        assert welcome.node_rank == 1 and welcome.heartbeat_timeout == HB_TIMEOUT
        async with trio.open_nursery() as starting:
            result = {}

            async def start():
                result["process"] = await launcher.start(request(3, tmp_path=tmp_path, PYTHONUNBUFFERED="1",
                                                                 INHERITED_ONLY=os.environ["INHERITED_ONLY"]))

            starting.start_soon(start)
            start_msg = await node1.receive_kind(protocol.AgentStart)
            await node1.send(protocol.AgentStarted(key=start_msg.key, pid=4242))
        process = result["process"]
        assert process.pid == 4242 and process.node_rank == 1
        env = start_msg.env
        assert (start_msg.rank, start_msg.local_rank) == (3, 1)
        assert env["LOCAL_RANK"] == "1" and env["GROUP_RANK"] == "1" and env["GROUP_WORLD_SIZE"] == "2"
        assert env["LOCAL_WORLD_SIZE"] == "2" and env["ROLE_RANK"] == "3" and env["RANK"] == "3"
        assert env["MASTER_ADDR"] == "10.0.0.1"  # node 0's advertised address
        assert "RANKWARDEN_COORDINATOR_PID" not in env  # the agent sets its own
        assert env["PYTHONUNBUFFERED"] == "1"  # sent although this process has it too
        assert "INHERITED_ONLY" not in env  # the coordinator's inheritance stays on its host
        assert process.sample() == CpuSample("R", 0.0)  # just started: no CPU used yet
        await node1.send(protocol.AgentHeartbeat(seq=1, cpu={start_msg.key: protocol.RankCpu("S", 2.5)}))
        await node1.receive_kind(protocol.AgentPong)
        assert process.sample() == CpuSample("S", 2.5)  # what the agent read from /proc
        await node1.send(protocol.AgentOutput(key=start_msg.key, stream="stderr", data=b"boom\n"))
        await node1.send(protocol.AgentExited(key=start_msg.key, code=None, signal=9))
        status = await process.wait()
        assert status == ExitStatus(signal=9)
        assert process.sample() is None  # ended: its exit is the exit watcher's to report
        assert (tmp_path / "r3.err").read_bytes() == b"boom\n"
        nursery.cancel_scope.cancel()


async def test_a_silent_agent_loses_its_node_at_exactly_heartbeat_timeout(autojump_clock):
    launcher = make_launcher(nnodes=1)
    async with trio.open_nursery() as nursery:
        agent = await connect(nursery, launcher, node_rank=0)
        await agent.receive()
        async with trio.open_nursery() as starting:
            result = {}

            async def start():
                result["process"] = await launcher.start(request(1))

            starting.start_soon(start)
            start_msg = await agent.receive_kind(protocol.AgentStart)
            await agent.send(protocol.AgentStarted(key=start_msg.key, pid=7))
        t0 = trio.current_time()
        await agent.send(protocol.AgentHeartbeat(seq=1))
        assert (await agent.receive_kind(protocol.AgentPong)).seq == 1
        await trio.sleep(3.0)
        await agent.send(protocol.AgentHeartbeat(seq=2))  # moves the deadline: t0 + 3 + 4
        status = await result["process"].wait()
        assert trio.current_time() == pytest.approx(t0 + 3.0 + HB_TIMEOUT)
        assert status.reason == NODE_LOST and not status.ok
        assert status.message.startswith("node 0 (host0")
        assert status.message.endswith("lost: no heartbeat for 4s (heartbeat_timeout)")
        assert launcher.nodes()[0].joined is False
        nursery.cancel_scope.cancel()


async def test_a_closed_connection_loses_the_node_at_once(autojump_clock):
    launcher = make_launcher(nnodes=1)
    async with trio.open_nursery() as nursery:
        agent = await connect(nursery, launcher, node_rank=0)
        await agent.receive()
        starting_done = trio.Event()
        result = {}

        async def start():
            result["process"] = await launcher.start(request(0))
            starting_done.set()

        nursery.start_soon(start)
        start_msg = await agent.receive_kind(protocol.AgentStart)
        await agent.send(protocol.AgentStarted(key=start_msg.key, pid=7))
        await starting_done.wait()
        t0 = trio.current_time()
        await agent.stream.aclose()
        status = await result["process"].wait()
        assert trio.current_time() == t0
        assert "its agent closed the connection" in status.message


@pytest.mark.parametrize("hello, why", [
    (dict(token="x" * 32), "wrong job secret"),
    (dict(nproc=3), "--nproc-per-node must be the same on every node"),
    (dict(node_rank=5), "node rank 5 is out of range"),
])
async def test_a_bad_agent_is_rejected_naming_why_and_others_carry_on(autojump_clock, hello, why):
    launcher = make_launcher()
    async with trio.open_nursery() as nursery:
        bad = await connect(nursery, launcher, **hello)
        reject = await bad.receive()
        assert isinstance(reject, protocol.Reject) and why in reject.reason
        good = await connect(nursery, launcher, node_rank=1)
        assert isinstance(await good.receive(), protocol.AgentWelcome)
        nursery.cancel_scope.cancel()


async def test_garbage_on_the_agent_endpoint_is_rejected(autojump_clock):
    launcher = make_launcher()
    async with trio.open_nursery() as nursery:
        ours, theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(launcher._handle, theirs)
        await ours.send_all(protocol.encode(protocol.Heartbeat(seq=1)))  # a rank's frame, not an agent's
        agent = FakeAgent(ours)
        assert isinstance(await agent.receive(), protocol.Reject)
        nursery.cancel_scope.cancel()


async def test_a_held_slot_is_refused_and_taken_by_a_replacement_once_lost(autojump_clock):
    launcher = make_launcher()
    async with trio.open_nursery() as nursery:
        first = await connect(nursery, launcher, node_rank=1)
        await first.receive()
        second = await connect(nursery, launcher, node_rank=1)
        reject = await second.receive()
        assert isinstance(reject, protocol.Reject) and "already held by node 1 (host1" in reject.reason
        await first.stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        anyone = await connect(nursery, launcher, node_rank=-1)  # "any free slot": the lowest, 0
        assert (await anyone.receive()).node_rank == 0
        replacement = await connect(nursery, launcher, node_rank=-1)
        assert (await replacement.receive()).node_rank == 1
        assert [n.joined for n in launcher.nodes()] == [True, True]
        nursery.cancel_scope.cancel()


async def test_a_rank_waits_for_its_node_up_to_join_timeout_then_fails_saying_which(autojump_clock):
    launcher = make_launcher()
    async with trio.open_nursery() as nursery:
        node0 = await connect(nursery, launcher, node_rank=0)
        await node0.receive()
        t0 = trio.current_time()
        with pytest.raises(LaunchError, match=r"needs node 1, and no agent has taken that slot for 30s"):
            await launcher.start(request(2, attempt=2))
        assert trio.current_time() == t0 + JOIN_TIMEOUT
        nursery.cancel_scope.cancel()


async def test_a_rank_waiting_for_its_node_starts_when_a_replacement_joins(autojump_clock):
    launcher = make_launcher()
    async with trio.open_nursery() as nursery:
        node0 = await connect(nursery, launcher, node_rank=0)
        await node0.receive()
        result = {}

        async def start():
            result["process"] = await launcher.start(request(2, attempt=2))

        nursery.start_soon(start)
        await trio.sleep(10.0)
        late = await connect(nursery, launcher, node_rank=1)
        start_msg = await late.receive_kind(protocol.AgentStart)
        assert start_msg.attempt == 2 and start_msg.local_rank == 0
        await late.send(protocol.AgentStarted(key=start_msg.key, pid=9))
        await trio.testing.wait_all_tasks_blocked()
        assert result["process"].pid == 9
        nursery.cancel_scope.cancel()


async def test_an_agent_that_cannot_start_the_rank_is_a_launch_error(autojump_clock):
    launcher = make_launcher(nnodes=1)
    async with trio.open_nursery() as nursery:
        agent = await connect(nursery, launcher, node_rank=0)
        await agent.receive()

        async def refuse():
            start_msg = await agent.receive_kind(protocol.AgentStart)
            await agent.send(protocol.AgentExited(key=start_msg.key, started=False, reason="LaunchFailed",
                                                  message="'python': No such file or directory"))

        nursery.start_soon(refuse)
        with pytest.raises(LaunchError, match="on node 0 .*No such file"):
            await launcher.start(request(0))
        nursery.cancel_scope.cancel()


async def test_shutdown_tells_every_agent_and_turns_new_ones_away(autojump_clock):
    launcher = make_launcher()
    async with trio.open_nursery() as nursery:
        agent = await connect(nursery, launcher, node_rank=0)
        await agent.receive()
        launcher.shutdown(True, "job succeeded")
        shutdown = await agent.receive_kind(protocol.AgentShutdown)
        assert shutdown.ok and shutdown.reason == "job succeeded"
        late = await connect(nursery, launcher, node_rank=1)
        reject = await late.receive()
        assert isinstance(reject, protocol.Reject) and "the job is over" in reject.reason
        nursery.cancel_scope.cancel()


# -- the agent's side of a refusal (real loopback TCP, real time) -----------------------


async def serving(nursery, launcher) -> str:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(launcher.serve, listeners)
    return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def test_an_agent_refused_for_good_exits_at_once_naming_why():
    launcher = make_launcher()
    async with trio.open_nursery() as nursery:
        endpoint = await serving(nursery, launcher)
        with trio.fail_after(10):  # join_timeout is 300: a refusal that cannot pass is not retried
            result = await run_agent(AgentConfig(endpoint=endpoint, token=TOKEN, node_rank=1, nproc=3))
        nursery.cancel_scope.cancel()
    assert (result.ok, result.exit_code) == (False, 75)
    assert "--nproc-per-node must be the same on every node" in result.reason


async def test_an_agent_refused_for_a_held_slot_retries_and_joins_once_it_frees():
    launcher = make_launcher()
    async with trio.open_nursery() as nursery:
        endpoint = await serving(nursery, launcher)
        holder = await connect(nursery, launcher, node_rank=1)
        await holder.receive()
        joined = trio.Event()

        async def second():
            await run_agent(AgentConfig(endpoint=endpoint, token=TOKEN, node_rank=1, nproc=2),
                            task_status=_Started(joined))

        nursery.start_soon(second)
        with trio.move_on_after(1.0):
            await joined.wait()
        assert not joined.is_set()  # refused while the slot is held, and still trying
        await holder.stream.aclose()  # the holder's host is lost
        with trio.fail_after(10):
            await joined.wait()
        assert launcher.nodes()[1].joined
        nursery.cancel_scope.cancel()


class _Started:
    def __init__(self, event: trio.Event) -> None:
        self._event = event

    def started(self, value=None) -> None:
        self._event.set()


async def test_an_endpoint_that_never_welcomes_is_retried_until_join_timeout(autojump_clock):
    # Something accepts the connection but never answers (a wedged coordinator, the wrong port).
    async def silent_connect():
        ours, theirs = trio.testing.memory_stream_pair()
        silent.append(theirs)
        return ours

    silent: list = []
    t0 = trio.current_time()
    result = await run_agent(AgentConfig(endpoint="head:1", token=TOKEN, node_rank=1, nproc=2, join_timeout=60),
                             connect=silent_connect)
    assert (result.ok, result.exit_code) == (False, 75)
    assert "no agent_welcome came back" in result.reason and "for 60s" in result.reason
    assert len(silent) >= 2 and trio.current_time() - t0 < 60 + 11
