"""Warm ranks (forked from the job's zygote) against fresh ones: same process, same contract.

Each test that forks warm ranks first waits for its zygote to import torch
(a few seconds of real time, bounded by ``fail_after``)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import trio

from rankwarden.coordinator import Coordinator
from rankwarden.coordinator._request import rank_env
from rankwarden.events import FailureCause, JobState
from rankwarden.launcher import BOOTSTRAP_MODULE, ExitStatus, LaunchRequest, ProcessLauncher
from rankwarden.launcher._warm import PER_RANK_VARIABLES
from rankwarden.spec import JobSpec

from .conftest import SESSION_MARKER, JOB_PREFIX, SCRIPTS

PROBE = os.path.join(SCRIPTS, "warm_probe.py")
WORKER = os.path.join(SCRIPTS, "worker.py")
LIMIT = 90  # seconds: a zygote importing torch on a loaded 2-CPU machine, plus the ranks


def test_ranks_and_attempts_differ_only_in_the_variables_a_zygote_ignores():
    # The zygote imported under one rank's environment less PER_RANK_VARIABLES;
    # if the coordinator set anything else per rank, a warm rank could have
    # imported torch under a value that is not its own.
    spec = JobSpec(entrypoint="train.py", world_size=4, checkpoint_url="memory://x")
    envs = [
        rank_env(spec, job_id="j", rank=rank, attempt=attempt, master_port=port, coordinator="127.0.0.1:1",
                 token="t", checkpoint_tag=f"a{attempt}", error_file=f"/j/attempt_{attempt}/{rank}/error.json")
        for rank, attempt, port in ((0, 1, 1000), (3, 2, 2000), (1, 7, 3000))
    ]
    differing = {k for env in envs[1:] for k in env.keys() | envs[0].keys() if env.get(k) != envs[0].get(k)}
    assert differing == PER_RANK_VARIABLES - {"GROUP_RANK"}  # GROUP_RANK differs only between pods


def _request(tmp_path, rank: int, warm: bool, *probe_args: str) -> LaunchRequest:
    # The environment `rank_env` gives a rank of a multi-rank job (OMP_NUM_THREADS=1 included).
    # Nothing another test left in this process's environment (a launcher's variables) reaches the probe.
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("RANKWARDEN_", "TORCHELASTIC_", "PYTHONFAULTHANDLER")) or k == SESSION_MARKER}
    env = dict(base, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", RANK=str(rank), LOCAL_RANK=str(rank))
    logs = tmp_path / "job" / "attempt_001"
    return LaunchRequest(
        job_id=f"{JOB_PREFIX}warm", rank=rank, local_rank=rank, attempt=1,
        argv=[sys.executable, "-m", BOOTSTRAP_MODULE, "script", PROBE, str(tmp_path / f"r{rank}.json"), *probe_args],
        env=env, cwd=str(tmp_path), stdout_path=str(logs / f"rank_{rank}.stdout"),
        stderr_path=str(logs / f"rank_{rank}.stderr"), warm=warm,
    )


async def _run(launcher, request) -> tuple[bool, ExitStatus]:
    process = await launcher.start(request)
    return process.warm, await process.wait()


async def _warmed_launcher(tmp_path) -> ProcessLauncher:
    """A launcher whose zygote for the test job is ready (its first rank ran fresh)."""
    launcher = ProcessLauncher()
    warm, status = await _run(launcher, _request(tmp_path, 99, True, "exit", "0"))
    assert not warm and status.ok  # the first start only starts the zygote
    assert await launcher.warm_ready(f"{JOB_PREFIX}warm")
    return launcher


def _read(tmp_path, rank):
    return json.loads((tmp_path / f"r{rank}.json").read_text())


async def test_a_warm_rank_sees_what_a_fresh_one_sees(tmp_path):
    with trio.fail_after(LIMIT):
        launcher = await _warmed_launcher(tmp_path)
        try:
            assert await _run(launcher, _request(tmp_path, 1, False, "exit", "0")) == (False, ExitStatus(code=0))
            assert await _run(launcher, _request(tmp_path, 2, True, "exit", "0")) == (True, ExitStatus(code=0))
        finally:
            await launcher.release(f"{JOB_PREFIX}warm")
    fresh, warm = _read(tmp_path, 1), _read(tmp_path, 2)
    assert (fresh["preloaded"], warm["preloaded"]) == (False, True)  # really one of each
    for record, rank in ((fresh, 1), (warm, 2)):
        assert record["argv"] == [PROBE, str(tmp_path / f"r{rank}.json"), "exit", "0"]
        assert record["env"]["RANK"] == record["c_env_rank"] == str(rank)
        assert record["pid"] == record["pgid"] == record["sid"]  # own session and process group
        assert record["death_signal"] == signal.SIGKILL
        assert record["stdout"] == str(tmp_path / "job" / "attempt_001" / f"rank_{rank}.stdout")
        assert record["stderr"] == str(tmp_path / "job" / "attempt_001" / f"rank_{rank}.stderr")
        assert record["threads_at_start"] == 1
    for key in ("name", "file", "spec", "path0", "cwd", "stdin", "fds", "handlers", "sigmask", "torch_num_threads"):
        assert fresh[key] == warm[key], (key, fresh.get("fd_targets"), warm.get("fd_targets"))
    assert (warm["name"], warm["file"], warm["spec"], warm["path0"]) == ("__main__", PROBE, "None", SCRIPTS)
    assert warm["cwd"] == str(tmp_path) and warm["stdin"] == "/dev/null"
    differing = {k for k in fresh["env"].keys() | warm["env"].keys() if fresh["env"].get(k) != warm["env"].get(k)}
    assert differing == {"RANK", "LOCAL_RANK"}
    out = (tmp_path / "job" / "attempt_001" / "rank_2.stdout").read_text()
    assert out == "probe 2 recorded\n"


@pytest.mark.parametrize(
    "how, expected, stderr",
    [
        (["exit", "3"], ExitStatus(code=3), ""),
        (["raise"], ExitStatus(code=1), "RuntimeError: probe failing on purpose"),
        (["message"], ExitStatus(code=1), "probe exiting with a message"),
        (["signal", str(int(signal.SIGTERM))], ExitStatus(signal=signal.SIGTERM), ""),
    ],
    ids=["exit-3", "exception", "exit-message", "sigterm"],
)
async def test_a_warm_rank_ends_with_the_status_a_fresh_one_has(tmp_path, how, expected, stderr):
    with trio.fail_after(LIMIT):
        launcher = await _warmed_launcher(tmp_path)
        try:
            fresh = await _run(launcher, _request(tmp_path, 1, False, *how))
            warm = await _run(launcher, _request(tmp_path, 2, True, *how))
        finally:
            await launcher.release(f"{JOB_PREFIX}warm")
    assert fresh == (False, expected) and warm == (True, expected)
    for rank in (1, 2):
        assert stderr in (tmp_path / "job" / "attempt_001" / f"rank_{rank}.stderr").read_text()


async def test_warm_ranks_of_a_script_that_never_seeds_get_their_own_randomness(tmp_path):
    with trio.fail_after(LIMIT):
        launcher = await _warmed_launcher(tmp_path)
        try:
            for rank in (1, 2, 3):
                assert await _run(launcher, _request(tmp_path, rank, True, "exit", "0")) == (True, ExitStatus(code=0))
        finally:
            await launcher.release(f"{JOB_PREFIX}warm")
    records = [_read(tmp_path, rank) for rank in (1, 2, 3)]
    for generator in ("random", "numpy", "torch"):
        draws = [tuple(record[generator]) for record in records]
        assert len(set(draws)) == 3, generator


def _spec(tmp_path, name, **overrides) -> JobSpec:
    record = tmp_path / "record"
    record.mkdir(exist_ok=True)
    data = dict(
        entrypoint=WORKER, args=["--record", str(record), "--until-file", str(tmp_path / "never"), "--steps", "3"],
        world_size=2, job_id=f"{JOB_PREFIX}{name}", job_dir=str(tmp_path / "job"), heartbeat_timeout=5.0,
        heartbeat_interval=0.1, startup_timeout=60.0, max_restarts=1, backoff=dict(initial=0.05, max=0.1),
        kill_grace=2.0, stop_grace=5.0,
    )
    data.update(overrides)
    return JobSpec.from_dict(data)


async def _kill_rank_1_once_warm(coordinator, launcher):
    """Attempt 1 runs until killed: once rank 1 steps and the zygote is ready (if any), kill it."""
    while coordinator.snapshot().ranks[1].step is None:
        await trio.sleep(0.05)
    assert await launcher.warm_ready(coordinator.job_id) is coordinator.spec.warm
    os.kill(coordinator.snapshot().ranks[1].pid, signal.SIGKILL)


async def _run_job(spec: JobSpec):
    launcher = ProcessLauncher()
    coordinator = Coordinator(spec, launcher=launcher)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(coordinator.run)
            nursery.start_soon(_kill_rank_1_once_warm, coordinator, launcher)
            snapshot = await coordinator.wait()
    events = [json.loads(line) for line in (coordinator.job_dir.path / "events.jsonl").read_text().splitlines()]
    return snapshot, [(e["attempt"], e["rank"], e["warm"]) for e in events if e["type"] == "rank_started"]


async def test_a_group_restart_is_warm_and_the_job_never_notices(tmp_path):
    # --until-file holds attempt 1 until the test kills rank 1; attempt 2 runs 3 steps.
    snapshot, started = await _run_job(_spec(tmp_path, "warmjob"))
    assert snapshot.state == JobState.SUCCEEDED and snapshot.attempt == 2
    [failure] = snapshot.failures
    assert (failure.cause, failure.signal) == (FailureCause.SIGNALED, signal.SIGKILL)
    assert sorted(started) == [(1, 0, False), (1, 1, False), (2, 0, True), (2, 1, True)]
    assert "ready after" in (tmp_path / "job" / "zygote.log").read_text()
    for rank in (0, 1):
        fresh = json.loads((tmp_path / "record" / f"r{rank}_a1.json").read_text())
        warm = json.loads((tmp_path / "record" / f"r{rank}_a2.json").read_text())
        assert warm["argv"] == fresh["argv"] and warm["name"] == fresh["name"] == "__main__"
        assert warm["path0"] == fresh["path0"] == SCRIPTS
        differing = {k for k in fresh["env"].keys() | warm["env"].keys() if fresh["env"].get(k) != warm["env"].get(k)}
        assert differing == {"MASTER_PORT", "RANKWARDEN_ATTEMPT", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_ERROR_FILE"}


async def test_no_warm_starts_every_rank_fresh_and_no_zygote(tmp_path):
    snapshot, started = await _run_job(_spec(tmp_path, "nowarm", warm=False))
    assert snapshot.state == JobState.SUCCEEDED and snapshot.attempt == 2
    assert sorted(started) == [(1, 0, False), (1, 1, False), (2, 0, False), (2, 1, False)]
    assert not (tmp_path / "job" / "zygote.log").exists()


async def test_a_command_that_is_not_python_starts_fresh_without_a_zygote(tmp_path):
    spec = JobSpec(entrypoint="true", no_python=True, world_size=1, job_id=f"{JOB_PREFIX}nopython",
                   job_dir=str(tmp_path / "job"), max_restarts=0)
    launcher = ProcessLauncher()
    with trio.fail_after(LIMIT):
        snapshot = await Coordinator(spec, launcher=launcher).run()
    assert snapshot.state == JobState.SUCCEEDED
    assert not await launcher.warm_ready(spec.job_id)
    assert not (tmp_path / "job" / "zygote.log").exists()


# -- `rankwarden run`: nothing of a warm job outlives it ----------------------------------

RANKWARDEN = [sys.executable, "-m", "rankwarden"]
FAST = ["--heartbeat-timeout", "2", "--heartbeat-interval", "0.1", "--backoff-initial", "0.05"]


async def _read_until(stream, seen: bytearray, pattern: bytes, count: int) -> list[int]:
    while len(found := re.findall(pattern, bytes(seen))) < count:
        chunk = await stream.receive_some(4096)
        assert chunk, f"rankwarden run exited; its output: {bytes(seen)[-2000:]!r}"
        seen += chunk
    return [int(p) for p in found]


async def _start_warm_job(tmp_path, name, *worker_args):
    """`rankwarden run` whose attempt 2 runs warm; returns it, the warm ranks' pids and the zygote's."""
    job = tmp_path / "job"
    process = await trio.lowlevel.open_process(
        [*RANKWARDEN, "run", "--nproc-per-node", "2", "--job-dir", str(job), "--run-id", f"{JOB_PREFIX}{name}", *FAST,
         WORKER, "--steps", "100000", "--step-time", "0.01", *worker_args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    seen = bytearray()
    first = await _read_until(process.stdout, seen, rb"ready pid (\d+)", 2)
    while b"ready after" not in ((job / "zygote.log").read_bytes() if (job / "zygote.log").exists() else b""):
        await trio.sleep(0.1)  # the zygote imports torch: seconds
    [zygote] = [int(p) for p in re.findall(rb"rankwarden zygote (\d+): ready", (job / "zygote.log").read_bytes())]
    os.kill(first[1], signal.SIGKILL)
    warm = (await _read_until(process.stdout, seen, rb"ready pid (\d+)", 4))[2:]
    events = [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines()]
    assert sorted((e["rank"], e["warm"]) for e in events if e["type"] == "rank_started" and e["attempt"] == 2) == [
        (0, True), (1, True)]
    return process, warm, zygote


async def _wait_exited(pid):
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


async def test_ctrl_c_of_rankwarden_run_leaves_no_warm_rank_and_no_zygote(tmp_path):
    # The autouse fixture also finds the ranks' `sleep` children if their groups survived.
    with trio.fail_after(LIMIT):
        process, warm, zygote = await _start_warm_job(tmp_path, "warm-ctrl-c", "--spawn-child")
        process.send_signal(signal.SIGINT)
        assert await process.wait() == 130
        for pid in (*warm, zygote):
            await _wait_exited(pid)


async def test_kill_9_of_the_coordinator_takes_the_zygote_and_warm_ranks_down(tmp_path):
    with trio.fail_after(LIMIT):
        process, warm, zygote = await _start_warm_job(tmp_path, "warm-kill-9")
        process.kill()
        await process.wait()
        # PR_SET_PDEATHSIG: coordinator -> zygote -> rank.
        for pid in (zygote, *warm):
            await _wait_exited(pid)
