"""Elastic node counts (``--nnodes MIN:MAX``): AgentLauncher's attempt sizing, with fake agents under MockClock.

The fake agents are those of tests/test_agent_membership.py (memory streams,
the agent_* messages); here they also heartbeat, since the waits below are
longer than heartbeat_timeout. Virtual times are asserted exactly. The
coordinator's side (the world size of each attempt in the ranks' env, the
snapshot and the checkpoint rule) is tested with a fake launcher that sizes
attempts; a real job on three hosts is in tests/test_agents.py.
"""

from __future__ import annotations

import argparse

import pytest
import trio
import trio.testing

from rankwarden import protocol
from rankwarden._multinode import node_plan
from rankwarden.checkpoint import CheckpointStore
from rankwarden.coordinator import Coordinator
from rankwarden.coordinator._request import rank_env
from rankwarden.errors import LaunchError, SpecError
from rankwarden.events import AttemptStarted, JobFailedEvent, JobState, ResumeChosen
from rankwarden.launcher import AgentLauncher, SizesAttempts
from rankwarden.launcher._agent import NODE_LOST
from rankwarden.spec import JobSpec
from rankwarden.testing import FakeLauncher, MemoryListener
from tests.test_agent_membership import HB_TIMEOUT, JOIN_TIMEOUT, TOKEN, connect, request

pytestmark = pytest.mark.liveness

LAST_CALL = 10.0


def make_launcher(min_nodes=2, nnodes=3, nproc=2, lines=None, last_call=LAST_CALL) -> AgentLauncher:
    return AgentLauncher(job_id="t-job", nnodes=nnodes, nproc=nproc, token=TOKEN, heartbeat_timeout=HB_TIMEOUT,
                         heartbeat_interval=1.0, join_timeout=JOIN_TIMEOUT, min_nodes=min_nodes,
                         last_call=last_call, on_change=(lines.append if lines is not None else None))


async def join(nursery, launcher, node_rank, address=""):
    """A fake agent that joins and heartbeats every second until its stream closes.

    A reader task takes everything the launcher sends (so its queue never
    fills); ``agent.inbox`` gives what a test waits for (``await agent.inbox.receive()``)."""
    agent = await connect(nursery, launcher, node_rank=node_rank, address=address or f"10.0.0.{node_rank + 1}")
    assert isinstance(await agent.receive(), protocol.AgentWelcome)
    send, agent.inbox = trio.open_memory_channel(float("inf"))

    async def beat():
        seq = 0
        try:
            while True:
                seq += 1
                await agent.send(protocol.AgentHeartbeat(seq=seq))
                await trio.sleep(1.0)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def read():
        try:
            while (message := await agent.receive()) is not None:
                if not isinstance(message, protocol.AgentPong):
                    send.send_nowait(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    nursery.start_soon(beat)
    nursery.start_soon(read)
    return agent


async def started(agent, pid: int) -> protocol.AgentStart:
    """The next AgentStart the agent was sent, answered as started."""
    start_msg = await agent.inbox.receive()
    assert isinstance(start_msg, protocol.AgentStart), start_msg
    await agent.send(protocol.AgentStarted(key=start_msg.key, pid=pid))
    return start_msg


async def test_the_first_attempt_waits_a_last_call_for_more_than_min_nodes_then_runs_on_those_joined(autojump_clock):
    lines: list[str] = []
    launcher = make_launcher(lines=lines)
    assert isinstance(launcher, SizesAttempts)
    async with trio.open_nursery() as nursery:
        for k in (0, 1):
            await join(nursery, launcher, k)
        t0 = trio.current_time()
        assert await launcher.size_attempt("t-job", 1) == 4
        assert trio.current_time() == t0 + LAST_CALL  # MIN were in: one last call for up to MAX, no more
        assert lines[-1] == "attempt 1 runs on 2 of 3 nodes (0, 1): world size 4"
        nursery.cancel_scope.cancel()


async def test_the_last_call_ends_when_max_nodes_have_joined(autojump_clock):
    launcher = make_launcher()
    async with trio.open_nursery() as nursery:
        for k in (0, 1):
            await join(nursery, launcher, k)
        t0 = trio.current_time()

        async def third():
            await trio.sleep(3.0)
            await join(nursery, launcher, -1)  # any free slot: slot 2

        nursery.start_soon(third)
        assert await launcher.size_attempt("t-job", 1) == 6
        assert trio.current_time() == t0 + 3.0
        nursery.cancel_scope.cancel()


async def test_fewer_than_min_nodes_wait_up_to_join_timeout_then_fail_saying_so(autojump_clock):
    launcher = make_launcher()
    async with trio.open_nursery() as nursery:
        await join(nursery, launcher, 0)
        t0 = trio.current_time()
        with pytest.raises(LaunchError, match=r"needs at least 2 node\(s\) \(--nnodes 2:3\) and only 1 joined "
                                              r"within 30s .*nodes joined: \[0\]"):
            await launcher.size_attempt("t-job", 1)
        assert trio.current_time() == t0 + JOIN_TIMEOUT
        nursery.cancel_scope.cancel()


async def test_fewer_than_min_nodes_start_once_the_min_th_node_joins(autojump_clock):
    lines: list[str] = []
    launcher = make_launcher(lines=lines, last_call=0.0)
    async with trio.open_nursery() as nursery:
        await join(nursery, launcher, 0)
        t0 = trio.current_time()

        async def second():
            await trio.sleep(7.0)
            await join(nursery, launcher, 2)

        nursery.start_soon(second)
        assert await launcher.size_attempt("t-job", 1) == 4
        assert trio.current_time() == t0 + 7.0
        assert "attempt 1 waits up to 30s for 2 of 3 nodes (--nnodes 2:3, --join-timeout); 1 joined" in lines
        assert lines[-1] == "attempt 1 runs on 2 of 3 nodes (0, 2): world size 4"
        nursery.cancel_scope.cancel()


async def test_after_a_node_is_lost_the_next_attempt_runs_at_once_on_the_rest_with_contiguous_ranks(
        autojump_clock, tmp_path):
    lines: list[str] = []
    launcher = make_launcher(lines=lines)
    async with trio.open_nursery() as nursery:
        agents = [await join(nursery, launcher, k) for k in range(3)]
        assert await launcher.size_attempt("t-job", 1) == 6
        await agents[1].stream.aclose()  # node 1's agent dies
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        assert await launcher.size_attempt("t-job", 2) == 4
        assert trio.current_time() == t0  # no last call and no join timeout: MIN remain
        assert lines[-1] == "node 1 lost; attempt 2 continues on 2 of 3 nodes (0, 2): world size 6 -> 4"
        # Rank 3 of the 4-rank world is local rank 1 of group rank 1, which is node slot 2.
        result = {}

        async def start():
            result["process"] = await launcher.start(request(3, attempt=2, tmp_path=tmp_path))

        async with trio.open_nursery() as starting:
            starting.start_soon(start)
            start_msg = await started(agents[2], 77)
        assert result["process"].node_rank == 2
        env = start_msg.env
        assert (start_msg.rank, start_msg.local_rank) == (3, 1)
        assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "LOCAL_WORLD_SIZE",
                                    "GROUP_WORLD_SIZE", "MASTER_ADDR")} == {
            "RANK": "3", "LOCAL_RANK": "1", "GROUP_RANK": "1", "ROLE_RANK": "3", "LOCAL_WORLD_SIZE": "2",
            "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1"}
        with pytest.raises(LaunchError, match="attempt 2 runs on 2 node"):
            await launcher.start(request(4, attempt=2))
        nursery.cancel_scope.cancel()


async def test_a_node_lost_after_sizing_ends_its_ranks_at_once_and_the_master_moves_with_node_0(autojump_clock):
    launcher = make_launcher()
    async with trio.open_nursery() as nursery:
        agents = [await join(nursery, launcher, k) for k in range(3)]
        assert await launcher.size_attempt("t-job", 1) == 6
        await agents[0].stream.aclose()  # node 0 (MASTER_ADDR's host) is lost
        await trio.testing.wait_all_tasks_blocked()
        process = await launcher.start(request(0, attempt=1))  # sized before the loss
        status = await process.wait()
        assert (status.reason, status.started) == (NODE_LOST, False)
        assert await launcher.size_attempt("t-job", 2) == 4
        async with trio.open_nursery() as starting:
            starting.start_soon(launcher.start, request(0, attempt=2))
            start_msg = await started(agents[1], 5)
        assert (start_msg.env["GROUP_RANK"], start_msg.env["MASTER_ADDR"]) == ("0", "10.0.0.2")
        nursery.cancel_scope.cancel()


async def test_a_node_that_joins_during_an_attempt_is_taken_in_at_the_next_one(autojump_clock):
    lines: list[str] = []
    launcher = make_launcher(lines=lines)
    async with trio.open_nursery() as nursery:
        agents = [await join(nursery, launcher, k) for k in (0, 1)]
        assert await launcher.size_attempt("t-job", 1) == 4
        await join(nursery, launcher, 2)  # joins while attempt 1 runs: it waits for the next attempt
        assert launcher.nodes()[2].joined and launcher.nodes()[2].ranks == 0
        await agents[1].stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        assert await launcher.size_attempt("t-job", 2) == 4
        assert trio.current_time() == t0
        assert lines[-1] == "node 1 lost; attempt 2 continues on 2 of 3 nodes (0, 2): world size 4 -> 4"
        nursery.cancel_scope.cancel()


async def test_a_fixed_node_count_is_sized_at_once_at_its_full_world(autojump_clock):
    lines: list[str] = []
    launcher = make_launcher(min_nodes=3, lines=lines)
    t0 = trio.current_time()
    assert await launcher.size_attempt("t-job", 1) == 6  # ranks wait in start() for their own slot, as before
    assert await launcher.size_attempt("t-job", 2) == 6
    assert trio.current_time() == t0
    assert lines == []  # no node-count lines for a job that cannot change its node count


def test_rank_env_takes_the_attempts_world_size():
    spec = JobSpec(entrypoint="train.py", world_size=6)
    env = rank_env(spec, job_id="j", rank=3, attempt=2, master_port=1, coordinator="c", token="t", base={},
                   world_size=4)
    assert (env["RANK"], env["WORLD_SIZE"], env["ROLE_WORLD_SIZE"]) == ("3", "4", "4")
    full = rank_env(spec, job_id="j", rank=3, attempt=1, master_port=1, coordinator="c", token="t", base={})
    assert (full["WORLD_SIZE"], full["ROLE_WORLD_SIZE"]) == ("6", "6")


def args(*argv: str) -> argparse.Namespace:
    from rankwarden.cli import _build_parser

    return _build_parser().parse_args(["run", *argv, "train.py"])


SECRET = {"RANKWARDEN_JOB_SECRET": "x" * 16}


def test_nnodes_min_max_plans_an_elastic_job():
    plan = node_plan(args("--nnodes", "2:3", "--node-rank", "1", "--rdzv-endpoint", "h:1"), SECRET)
    assert (plan.min_nodes, plan.nnodes, plan.last_call) == (2, 3, 30.0)
    plan = node_plan(args("--nnodes", "1:2", "--node-rank", "0", "--rdzv-endpoint", "h:1",
                          "--rdzv-conf", "join_timeout=5,last_call_timeout=2.5"), SECRET)
    assert (plan.min_nodes, plan.nnodes, plan.last_call) == (1, 2, 2.5)
    plan = node_plan(args("--nnodes", "1:2", "--node-rank", "0", "--rdzv-endpoint", "h:1",
                          "--last-call-timeout", "0"), SECRET)
    assert plan.last_call == 0.0
    plan = node_plan(args("--nnodes", "3", "--node-rank", "0", "--rdzv-endpoint", "h:1"), SECRET)
    assert (plan.min_nodes, plan.nnodes) == (3, 3)  # not elastic


@pytest.mark.parametrize("argv, message", [
    (("--nnodes", "3:2"), r"--nnodes '3:2': expected 1 <= MIN <= MAX"),
    (("--nnodes", "0:2"), r"--nnodes '0:2': expected 1 <= MIN <= MAX"),
    (("--nnodes", "2:x"), r"expected N or MIN:MAX"),
    (("--nnodes", "1:2", "--restart-scope", "rank"), r"needs --restart-scope group and no --live"),
    (("--nnodes", "1:2", "--live"), r"needs --restart-scope group and no --live"),
    (("--nnodes", "1:2", "--rdzv-conf", "last_call_timeout=soon"), r"last_call_timeout='soon': expected seconds"),
])
def test_bad_elastic_node_counts_name_the_problem(argv, message):
    with pytest.raises(SpecError, match=message):
        node_plan(args(*argv, "--node-rank", "0", "--rdzv-endpoint", "h:1"), SECRET)


# -- the coordinator's side: a launcher that sizes attempts -------------------------------------------

JOB = "t-elastic"


class SizingLauncher(FakeLauncher):
    """A FakeLauncher whose group attempts have the sizes given, in order (a node lost after each)."""

    def __init__(self, sizes: list[int], *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sizes = sizes

    async def size_attempt(self, job_id: str, attempt: int) -> int:
        return self.sizes[min(attempt, len(self.sizes)) - 1]


async def _run_elastic(tmp_path, layout: str):
    """Attempt 1 (4 ranks) commits step 2, then rank 3 fails; attempt 2 (2 ranks) resumes and commits step 4."""
    seen = []

    async def rank(fake):
        welcome = await fake.hello()
        seen.append((fake.attempt, fake.rank, fake.env["WORLD_SIZE"], fake.env["ROLE_WORLD_SIZE"],
                     welcome.resume.step))
        step = 2 if fake.attempt == 1 else 4
        store = CheckpointStore(fake.env["RANKWARDEN_CHECKPOINT_URL"], JOB)
        entry = store.write_file(step, f"rank_{fake.rank:05d}.pt", b"state",
                                 tag=fake.env["RANKWARDEN_CHECKPOINT_TAG"])
        info = protocol.FileInfo(name=entry.name, size=entry.size, checksum=entry.checksum)
        await fake.send(protocol.CheckpointReady(step=step, files=[info], layout=layout))
        if fake.attempt == 1:
            await trio.sleep(1.0)  # every rank's step 2 is committed before the failure
            if fake.rank == 3:
                return 1
            await trio.sleep_forever()
        await fake.goodbye(0)
        return 0

    spec = JobSpec.from_dict(dict(entrypoint="/srv/train.py", world_size=4, job_id=JOB, job_dir=str(tmp_path / "job"),
                                  checkpoint_url=str(tmp_path / "ckpt"), max_restarts=2))
    listener = MemoryListener()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            launcher = SizingLauncher([4, 2], rank, listener, nursery)
            coordinator = Coordinator(spec, launcher=launcher, listeners=[listener])
            snapshot = await coordinator.run()
            nursery.cancel_scope.cancel()
    return snapshot, coordinator.history(), sorted(seen)


async def test_an_elastic_job_resumes_a_sharded_checkpoint_on_fewer_ranks_with_their_world_size(tmp_path):
    snapshot, events, seen = await _run_elastic(tmp_path, "dcp")
    assert snapshot.state == JobState.SUCCEEDED
    assert seen == [(1, r, "4", "4", None) for r in range(4)] + [(2, r, "2", "2", 2) for r in range(2)]
    assert snapshot.world_size == 2 and [r.rank for r in snapshot.ranks] == [0, 1]
    assert [e.world_size for e in events if isinstance(e, AttemptStarted)] == [4, 2]
    chosen = [e.message for e in events if isinstance(e, ResumeChosen)]
    assert chosen[-1] == "resuming from step 2 (written by 4 rank(s), resharded on load)"
    store = CheckpointStore(str(tmp_path / "ckpt"), JOB)
    assert [(m.step, m.world_size, m.writer.world_size) for m in (store.verify(2), store.verify(4))] == [
        (2, 4, 4), (4, 2, 2)]


async def test_an_elastic_job_refuses_a_per_rank_checkpoint_on_fewer_ranks_naming_the_fix(tmp_path):
    snapshot, events, seen = await _run_elastic(tmp_path, "rank")
    assert snapshot.state == JobState.FAILED
    assert [s[0] for s in seen] == [1, 1, 1, 1]  # no rank of attempt 2 started: none on a wrong state
    [failed] = [e for e in events if isinstance(e, JobFailedEvent)]
    assert "step 2 was written by 4 rank(s), this job has 2" in failed.message
    assert "an elastic job (--nnodes MIN:MAX)" in failed.message and "must save sharded state" in failed.message


class WaitingLauncher(FakeLauncher):
    """Too few nodes: sizing waits ``wait`` seconds, then fails as AgentLauncher does after join_timeout."""

    wait = JOIN_TIMEOUT

    async def size_attempt(self, job_id: str, attempt: int) -> int:
        await trio.sleep(self.wait)
        raise LaunchError(f"attempt {attempt} needs at least 2 node(s) (--nnodes 2:3) and only 1 joined")


async def _run_waiting(tmp_path, stop_at: float | None):
    started = []

    async def rank(fake):
        started.append(fake.rank)
        return 0

    spec = JobSpec.from_dict(dict(entrypoint="/srv/train.py", world_size=4, job_id=JOB, job_dir=str(tmp_path / "job"),
                                  max_restarts=2))
    listener = MemoryListener()
    async with trio.open_nursery() as nursery:
        coordinator = Coordinator(spec, launcher=WaitingLauncher(rank, listener, nursery), listeners=[listener])
        if stop_at is not None:
            async def stop():
                await trio.sleep(stop_at)
                coordinator.stop("test stop")

            nursery.start_soon(stop)
        snapshot = await coordinator.run()
        nursery.cancel_scope.cancel()
    return snapshot, coordinator.history(), started


async def test_too_few_nodes_for_join_timeout_fail_the_job_naming_them(autojump_clock, tmp_path):
    t0 = trio.current_time()
    snapshot, events, started = await _run_waiting(tmp_path, None)
    assert snapshot.state == JobState.FAILED and started == []
    assert trio.current_time() - t0 == pytest.approx(JOIN_TIMEOUT)
    [failed] = [e for e in events if isinstance(e, JobFailedEvent)]
    assert "needs at least 2 node(s) (--nnodes 2:3) and only 1 joined" in failed.message


async def test_a_stop_while_waiting_for_nodes_stops_the_job_at_once(autojump_clock, tmp_path):
    t0 = trio.current_time()
    snapshot, events, started = await _run_waiting(tmp_path, 5.0)
    assert snapshot.state == JobState.STOPPED and started == []
    assert trio.current_time() - t0 == pytest.approx(5.0)
    assert not [e for e in events if isinstance(e, JobFailedEvent)]
