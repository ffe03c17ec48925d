"""The coordinator with real processes, real signals and a real heartbeat socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

import trio

from rankwarden import protocol
from rankwarden.coordinator import Coordinator
from rankwarden.events import FailureCause, JobState, PeerRejected, RankState
from rankwarden.spec import JobSpec

from .conftest import JOB_PREFIX, SCRIPTS

WORKER = os.path.join(SCRIPTS, "worker.py")
LIMIT = 60  # seconds any one real job may take before the test fails


def spec_for(tmp_path, name, *worker_args, **overrides) -> JobSpec:
    record = tmp_path / "record"
    record.mkdir(exist_ok=True)
    data = dict(
        entrypoint=WORKER,
        args=["--record", str(record), *worker_args],
        world_size=2,
        job_id=f"{JOB_PREFIX}{name}",
        job_dir=str(tmp_path / "job"),
        heartbeat_timeout=2.0,
        heartbeat_interval=0.1,
        progress_timeout=5.0,
        startup_timeout=30.0,
        max_restarts=2,
        backoff=dict(initial=0.05, max=0.1),
        kill_grace=2.0,
        stop_grace=5.0,
    )
    data.update(overrides)
    return JobSpec.from_dict(data)


async def run(spec: JobSpec, during=None):
    coordinator = Coordinator(spec)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(coordinator.run)
            if during is not None:
                nursery.start_soon(during, coordinator)
            snapshot = await coordinator.wait()
            nursery.cancel_scope.cancel()
    return snapshot, coordinator


def recorded(tmp_path, rank, attempt):
    return json.loads((tmp_path / "record" / f"r{rank}_a{attempt}.json").read_text())


async def test_clean_success_gives_each_rank_the_torchrun_environment(tmp_path):
    spec = spec_for(tmp_path, "env", "--steps", "3")
    snapshot, coordinator = await run(spec)
    assert snapshot.state == JobState.SUCCEEDED
    assert snapshot.failures == []
    assert [r.step for r in snapshot.ranks] == [3, 3]
    ports = set()
    for rank in (0, 1):
        seen = recorded(tmp_path, rank, 1)
        env = seen["env"]
        assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == (str(rank), str(rank), "2", "2")
        assert (env["GROUP_RANK"], env["MASTER_ADDR"], env["TORCHELASTIC_RESTART_COUNT"]) == ("0", "127.0.0.1", "0")
        assert (env["TORCHELASTIC_MAX_RESTARTS"], env["TORCHELASTIC_RUN_ID"]) == ("2", spec.job_id)
        assert env["RANKWARDEN_JOB_ID"] == spec.job_id and env["RANKWARDEN_ATTEMPT"] == "1"
        assert env["RANKWARDEN_COORDINATOR"] == coordinator.address and len(env["RANKWARDEN_TOKEN"]) >= 32
        assert env["OMP_NUM_THREADS"] == "1"
        ports.add(env["MASTER_PORT"])
        # Run exactly like `python worker.py ARGS`.
        assert seen["name"] == "__main__" and seen["path0"] == SCRIPTS
        assert seen["argv"] == [WORKER, "--record", str(tmp_path / "record"), "--steps", "3"]
        out = (tmp_path / "job" / "attempt_001" / f"rank_{rank}.stdout").read_text()
        assert out == f"rank {rank} ready pid {seen['pid']}\nrank {rank} done after 3 steps\n"
    assert len(ports) == 1


async def test_rank_exiting_1_restarts_the_group_with_a_fresh_master_port(tmp_path):
    spec = spec_for(tmp_path, "exit1", "--fail-rank", "1", "--fail-mode", "exit1")
    snapshot, _ = await run(spec)
    assert snapshot.state == JobState.SUCCEEDED and snapshot.attempt == 2
    [failure] = snapshot.failures
    assert (failure.rank, failure.attempt, failure.cause, failure.exit_code) == (1, 1, FailureCause.EXITED, 1)
    # Rank 1's records: it surely ran in attempt 1 (it failed there); rank 0 may
    # not have got as far as writing its record before the group was stopped.
    first, second = recorded(tmp_path, 1, 1)["env"], recorded(tmp_path, 1, 2)["env"]
    assert first["MASTER_PORT"] != second["MASTER_PORT"]
    assert second["TORCHELASTIC_RESTART_COUNT"] == "1"
    assert "failing on purpose" in (tmp_path / "job" / "attempt_001" / "rank_1.stderr").read_text()


async def test_kill_9_is_seen_as_the_exit_it_is(tmp_path):
    spec = spec_for(tmp_path, "kill", "--fail-rank", "0", "--fail-mode", "kill")
    snapshot, _ = await run(spec)
    assert snapshot.state == JobState.SUCCEEDED
    [failure] = snapshot.failures
    assert (failure.cause, failure.signal) == (FailureCause.SIGNALED, signal.SIGKILL)
    assert "killed by SIGKILL" in failure.message


async def test_sigstopped_rank_is_caught_by_the_heartbeat_timeout(tmp_path):
    spec = spec_for(tmp_path, "stop", "--fail-rank", "1", "--fail-mode", "stop", heartbeat_timeout=1.0)
    snapshot, _ = await run(spec)
    assert snapshot.state == JobState.SUCCEEDED
    [failure] = snapshot.failures
    assert failure.cause == FailureCause.HEARTBEAT_TIMEOUT and failure.rank == 1
    assert 1.0 <= failure.detected_after < 2.5  # timeout plus scheduling on a loaded machine


async def test_rank_that_heartbeats_but_stops_stepping_is_caught_by_progress_timeout(tmp_path):
    spec = spec_for(tmp_path, "hang", "--fail-rank", "0", "--fail-mode", "hang", progress_timeout=1.0)
    snapshot, _ = await run(spec)
    assert snapshot.state == JobState.SUCCEEDED
    [failure] = snapshot.failures
    assert failure.cause == FailureCause.PROGRESS_TIMEOUT and failure.rank == 0
    assert "past step 2" in failure.message


async def test_command_that_never_says_hello_fails_at_startup_timeout(tmp_path):
    spec = JobSpec(
        entrypoint="sleep", args=["30"], no_python=True, world_size=1, job_id=f"{JOB_PREFIX}nohello",
        job_dir=str(tmp_path / "job"), startup_timeout=0.5, max_restarts=0,
    )
    snapshot, _ = await run(spec)
    assert snapshot.state == JobState.FAILED
    [failure] = snapshot.failures
    assert failure.cause == FailureCause.STARTUP_TIMEOUT


async def test_no_python_command_using_the_worker_library_connects_itself(tmp_path):
    spec = spec_for(tmp_path, "exec", world_size=1)
    spec = spec.replace(entrypoint=sys.executable, no_python=True, args=[WORKER, *spec.args, "--steps", "3"])
    snapshot, _ = await run(spec)
    assert snapshot.state == JobState.SUCCEEDED
    assert snapshot.ranks[0].step == 3  # reports arrived: it connected on its first report


async def test_spent_budget_fails_the_job_and_reports_the_first_failure_first(tmp_path):
    spec = spec_for(tmp_path, "budget", "--fail-rank", "1", "--fail-attempt", "0", max_restarts=1)
    snapshot, coordinator = await run(spec)
    assert snapshot.state == JobState.FAILED
    assert [(f.attempt, f.rank, f.cause) for f in snapshot.failures] == [
        (1, 1, FailureCause.EXITED),
        (2, 1, FailureCause.EXITED),
    ]
    report = coordinator.failure_report()
    assert report.splitlines()[1].startswith("Root cause (first observed failure): attempt 1, rank 1")
    result = json.loads((tmp_path / "job" / "result.json").read_text())
    assert result["state"] == "failed" and len(result["failures"]) == 2


async def test_rank_scope_restarts_only_the_failed_rank(tmp_path):
    spec = spec_for(tmp_path, "scope", "--fail-rank", "1", "--steps", "8", restart_scope="rank")
    snapshot, _ = await run(spec)
    assert snapshot.state == JobState.SUCCEEDED
    records = sorted(p.name for p in (tmp_path / "record").glob("r*_a*.json"))
    assert records == ["r0_a1.json", "r1_a1.json", "r1_a2.json"]
    assert recorded(tmp_path, 0, 1)["pid"] == snapshot.ranks[0].pid  # rank 0 kept its process


async def test_bad_frames_and_wrong_tokens_on_the_socket_do_not_disturb_the_ranks(tmp_path):
    spec = spec_for(tmp_path, "intruder", "--steps", "20")
    replies = []

    async def intrude(coordinator):
        host, port = coordinator.address.rsplit(":", 1)
        hello = protocol.Hello(version=1, job=coordinator.job_id, rank=0, attempt=1, pid=1, token="wrong")
        for payload in (b"\x00\x00\x00\x04junk", protocol.encode(hello), b"\xff" * 16):
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                await stream.send_all(payload)
                decoder = protocol.FrameDecoder(protocol.ToRank)
                with trio.fail_after(5):
                    while not (messages := decoder.feed(await stream.receive_some(4096))):
                        pass
                replies.append(messages[0])

    snapshot, _ = await run(spec, during=intrude)
    assert snapshot.state == JobState.SUCCEEDED and snapshot.failures == []
    assert [type(r) for r in replies] == [protocol.Reject] * 3
    assert "wrong job token" in replies[1].reason
    lines = (tmp_path / "job" / "events.jsonl").read_text().splitlines()
    assert sum('"type":"peer_rejected"' in line for line in lines) == 3


async def test_children_a_rank_leaves_behind_are_killed_with_it(tmp_path):
    # The autouse fixture fails the test if the `sleep 1000` children survive.
    spec = spec_for(tmp_path, "children", "--spawn-child", "--steps", "2")
    snapshot, _ = await run(spec)
    assert snapshot.state == JobState.SUCCEEDED


async def test_stop_ends_the_job_stopped_and_leaves_nothing(tmp_path):
    spec = spec_for(tmp_path, "stopjob", "--steps", "1000", "--spawn-child")

    async def stop_when_running(coordinator):
        while not all(r.step for r in coordinator.snapshot().ranks):
            await trio.sleep(0.05)
        coordinator.stop("test")

    snapshot, _ = await run(spec, during=stop_when_running)
    assert snapshot.state == JobState.STOPPED
    assert snapshot.failures == []
    assert [r.state for r in snapshot.ranks] == [RankState.STOPPED] * 2


async def test_launch_failure_is_a_failure_record_not_a_crash(tmp_path):
    spec = spec_for(tmp_path, "nolaunch", world_size=1, max_restarts=0, python="/nonexistent/python")
    snapshot, _ = await run(spec)
    assert snapshot.state == JobState.FAILED
    [failure] = snapshot.failures
    assert failure.cause == FailureCause.LAUNCH_FAILED and "/nonexistent/python" in failure.message


def test_free_port_avoids_the_previous_port():
    from rankwarden.coordinator._request import free_port

    first = free_port("127.0.0.1")
    assert all(free_port("127.0.0.1", exclude=first) != first for _ in range(20))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", first))  # it really was free


async def test_a_rank_outlives_trios_idle_worker_threads(tmp_path):
    # Regression: ranks were forked in a worker thread of trio's cache; PDEATHSIG
    # follows the parent *thread*, and trio retires idle threads after 10 s,
    # which SIGKILLed every rank older than that.
    spec = spec_for(tmp_path, "long", "--steps", "120", "--step-time", "0.1", world_size=1, progress_timeout=30.0)
    snapshot, _ = await run(spec)
    assert snapshot.failures == []
    assert snapshot.state == JobState.SUCCEEDED and snapshot.ranks[0].step == 120


async def test_a_drain_aware_rank_checkpoints_and_exits_0_on_stop(tmp_path):
    spec = spec_for(tmp_path, "drain", "--steps", "100000", "--step-time", "0.01", "--graceful")

    async def stop_when_running(coordinator):
        async for event in coordinator.events():
            if type(event).__name__ == "RankConnected" and event.rank == 1:
                break
        while not all(r.step for r in coordinator.snapshot().ranks):
            await trio.sleep(0.05)
        coordinator.stop("test")

    snapshot, _ = await run(spec, during=stop_when_running)
    assert snapshot.state == JobState.STOPPED and snapshot.failures == []
    assert [r.exit_code for r in snapshot.ranks] == [0, 0]  # drained, not killed
    for rank in (0, 1):
        out = (tmp_path / "job" / "attempt_001" / f"rank_{rank}.stdout").read_text()
        assert f"rank {rank} drained at step" in out
