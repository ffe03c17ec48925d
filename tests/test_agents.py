"""Multi-node jobs for real: `rankwarden run --nnodes 2` processes, one per "host".

Hosts are network namespaces on one bridge (tests/netns.py; skipped without
root), so a host can be cut off and healed; one test uses two loopback
addresses and needs nothing. Every node is the real command line, as a user
runs it under srun or ssh; the coordinator is node 0's process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import JOB_PREFIX, SCRIPTS
from tests.netns import Cluster

pytestmark = pytest.mark.liveness

WORKER = os.path.join(SCRIPTS, "worker.py")
#: Ranks on agent hosts get no CPU check before being called frozen (see coordinator/_rank.py):
#: a loaded 2-core CI host needs this margin over the 0.2 s interval.
HB_TIMEOUT = 3.0
INTERVAL = 0.2
SECRET = "test-secret-" + "0123456789abcdef"
PORT = 29400


def node_argv(node_rank: int, endpoint: str, job_dir: Path, *script: str, nnodes: int = 2, nproc: int = 2,
              extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "rankwarden", "run", "--nnodes", str(nnodes), "--node-rank", str(node_rank),
            "--rdzv-endpoint", endpoint, "--nproc-per-node", str(nproc), "--heartbeat-timeout", str(HB_TIMEOUT),
            "--heartbeat-interval", str(INTERVAL), "--backoff-initial", "0.05", "--join-timeout", "60",
            "--kill-grace", "1", "--stop-grace", "2", "--job-dir", str(job_dir), "--run-id", f"{JOB_PREFIX}{job_dir.name}",
            "--log-level", "INFO", *extra, *script]


def env(**extra: str) -> dict[str, str]:
    result = dict(os.environ, RANKWARDEN_JOB_SECRET=SECRET)
    result.update(extra)
    return result


def events(job_dir: Path) -> list[dict]:
    path = job_dir / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(what: str, predicate, timeout: float = 60.0, procs: tuple = ()):
    """Poll ``predicate`` (files written by other processes) until it holds, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"waiting for {what}: node process exited with {proc.returncode}: "
                                     f"{proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def connected(job_dir: Path, attempt: int, ranks: int = 4) -> bool:
    return sum(e["type"] == "rank_connected" and e["attempt"] == attempt for e in events(job_dir)) >= ranks


def first_failure(job_dir: Path) -> dict | None:
    return next((e for e in events(job_dir) if e["type"] == "rank_failed"), None)


def finish(procs: list[subprocess.Popen], timeout: float = 90.0) -> list[str]:
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        outputs.append(out)
    return outputs


def popen_kwargs() -> dict:
    return dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())


@pytest.fixture
def cluster():
    made = Cluster(nodes=1)
    try:
        yield made
    finally:
        left = made.close()
    assert not left, f"processes left on the test hosts: {left}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_on_loopback_run_every_rank_with_torchruns_multi_node_environment(tmp_path):
    job_dir, record = tmp_path / "loop", tmp_path / "record"
    record.mkdir()
    endpoint = f"127.0.0.1:{free_port()}"
    script = (WORKER, "--steps", "2", "--record", str(record))
    node1 = subprocess.Popen(node_argv(1, endpoint, job_dir, *script, extra=("--local-addr", "127.0.0.2")),
                             **popen_kwargs())
    node0 = subprocess.Popen(node_argv(0, endpoint, job_dir, *script), **popen_kwargs())
    out0, out1 = finish([node0, node1])
    assert node0.returncode == 0, out0
    assert node1.returncode == 0, out1
    assert "node 1: job succeeded" in out1
    recorded = {r: json.loads((record / f"r{r}_a1.json").read_text())["env"] for r in range(4)}
    for rank, rank_env in recorded.items():
        node, local = divmod(rank, 2)
        assert {k: rank_env[k] for k in ("RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "WORLD_SIZE",
                                         "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE")} == {
            "RANK": str(rank), "LOCAL_RANK": str(local), "GROUP_RANK": str(node), "ROLE_RANK": str(rank),
            "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "2", "ROLE_WORLD_SIZE": "4"}
        assert rank_env["MASTER_ADDR"] == "127.0.0.1"  # node 0's address
    assert recorded[0]["MASTER_PORT"] == recorded[3]["MASTER_PORT"]
    # Node 1's ranks are its agent's children, and their output is in node 0's job directory.
    assert recorded[2]["RANKWARDEN_COORDINATOR_PID"] == str(node1.pid)
    assert "rank 2 done after 2 steps" in (job_dir / "attempt_001" / "rank_2.stdout").read_text()
    assert "[rank3]: rank 3 done after 2 steps" in out0
    assert "rankwarden: node 1 (" in out0 and "joined" in out0


@pytest.mark.parametrize("mode, cause, exit_code, signum", [
    ("exit1", "exited", 1, None), ("kill", "signaled", None, signal.SIGKILL)])
def test_a_rank_on_another_node_is_reported_exactly_as_it_ended(tmp_path, mode, cause, exit_code, signum):
    job_dir = tmp_path / mode
    endpoint = f"127.0.0.1:{free_port()}"
    script = (WORKER, "--steps", "3", "--fail-rank", "3", "--fail-step", "1", "--fail-mode", mode)
    node1 = subprocess.Popen(node_argv(1, endpoint, job_dir, *script), **popen_kwargs())
    node0 = subprocess.Popen(node_argv(0, endpoint, job_dir, *script), **popen_kwargs())
    out0, out1 = finish([node0, node1])
    assert node0.returncode == 0 and node1.returncode == 0, out0 + out1
    failure = first_failure(job_dir)["failure"]
    assert (failure["rank"], failure["cause"], failure["exit_code"], failure["signal"]) == (3, cause, exit_code, signum)
    if mode == "exit1":
        assert "rank 3 failing on purpose" in (job_dir / "attempt_001" / "rank_3.stderr").read_text()


def test_a_configuration_error_on_another_node_is_judged_from_its_streamed_stderr(tmp_path):
    # Fail-fast compares the last lines of stderr of two attempts when it judges
    # an exit: they must have arrived from node 1 before its exit was reported.
    script = tmp_path / "broken_on_node_1.py"
    script.write_text("import os, time\n"
                      "if os.environ['GROUP_RANK'] == '1':\n"
                      "    raise ImportError(\"No module named 'only_on_node_0'\")\n"
                      "time.sleep(60)\n")
    job_dir = tmp_path / "config"
    endpoint = f"127.0.0.1:{free_port()}"
    node1 = subprocess.Popen(node_argv(1, endpoint, job_dir, str(script), nproc=1), **popen_kwargs())
    node0 = subprocess.Popen(node_argv(0, endpoint, job_dir, str(script), nproc=1), **popen_kwargs())
    out0, out1 = finish([node0, node1])
    assert node0.returncode == 1 and node1.returncode == 1, out0 + out1
    assert "configuration error" in out0 and "only_on_node_0" in out0, out0
    assert sum(e["type"] == "attempt_started" for e in events(job_dir)) == 2  # not the whole budget


@pytest.mark.timeout(120)  # seconds of CPU held: several times that in wall time on a loaded host
def test_a_rank_on_another_node_busy_in_a_gil_holding_call_is_watched_not_restarted(tmp_path):
    # Its heartbeat thread is starved for twice the timeout; the agent's CPU samples say it is busy.
    job_dir = tmp_path / "busy"
    endpoint = f"127.0.0.1:{free_port()}"
    script = (os.path.join(SCRIPTS, "hold_gil.py"), str(2 * HB_TIMEOUT))
    node1 = subprocess.Popen(node_argv(1, endpoint, job_dir, *script, nproc=1), **popen_kwargs())
    node0 = subprocess.Popen(node_argv(0, endpoint, job_dir, *script, nproc=1), **popen_kwargs())
    out0, out1 = finish([node0, node1])
    assert node0.returncode == 0 and node1.returncode == 0, out0 + out1
    kinds = [e["type"] for e in events(job_dir)]
    assert "rank_failed" not in kinds and kinds.count("attempt_started") == 1, out0
    assert any(e["type"] == "rank_busy" and e["rank"] == 1 for e in events(job_dir)), out0


def test_a_coordinator_on_a_host_of_its_own_with_an_agent_on_every_node(tmp_path):
    job_dir, record = tmp_path / "own", tmp_path / "record"
    record.mkdir()
    endpoint = f"127.0.0.1:{free_port()}"
    script = (WORKER, "--steps", "2", "--record", str(record))

    def role(command: str, argv: list[str]) -> list[str]:
        return [*argv[:3], command, *argv[4:]]  # `python -m rankwarden run ...` -> `... COMMAND ...`

    agents = [subprocess.Popen(role("agent", node_argv(k, endpoint, job_dir, *script, nproc=1)), **popen_kwargs())
              for k in (1, 0)]
    coordinator = subprocess.Popen(role("coordinator", node_argv(0, endpoint, job_dir, *script, nproc=1)),
                                   **popen_kwargs())
    outputs = finish([coordinator, *agents])
    assert [p.returncode for p in (coordinator, *agents)] == [0, 0, 0], outputs
    envs = [json.loads((record / f"r{r}_a1.json").read_text())["env"] for r in (0, 1)]
    # Node 0 is an agent like the others: its rank is that agent's child, not the coordinator's.
    assert envs[0]["RANKWARDEN_COORDINATOR_PID"] == str(agents[1].pid)
    assert envs[1]["RANKWARDEN_COORDINATOR_PID"] == str(agents[0].pid)
    assert [(e["GROUP_RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in envs] == [("0", "0", "2"), ("1", "0", "2")]


def test_a_wrong_secret_is_refused_and_the_node_exits_saying_so(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    job_dir = tmp_path / "secret"
    node0 = subprocess.Popen(node_argv(0, endpoint, job_dir, WORKER, "--steps", "1", nnodes=2, extra=()),
                             **popen_kwargs())
    try:
        wait_for("node 0 to listen", lambda: (job_dir / "events.jsonl").exists(), procs=(node0,))
        bad = subprocess.run(node_argv(1, endpoint, job_dir, WORKER), capture_output=True, text=True, timeout=60,
                             env=env(RANKWARDEN_JOB_SECRET="another-secret-0123456789"))
    finally:
        node0.send_signal(signal.SIGTERM)
        finish([node0])
    assert bad.returncode == 75, bad.stdout + bad.stderr
    assert "wrong job secret" in bad.stdout


def test_kill_9_of_an_agent_restarts_the_group_on_a_replacement_node(tmp_path, cluster):
    job_dir = tmp_path / "kill9"
    endpoint = f"{cluster.address(0)}:{PORT}"
    until = tmp_path / "never"
    script = (WORKER, "--steps", "5", "--until-file", str(until), "--until-attempt", "1")
    node0 = cluster.popen(0, node_argv(0, endpoint, job_dir, *script), **popen_kwargs())
    node1 = cluster.popen(1, node_argv(1, endpoint, job_dir, *script), **popen_kwargs())
    wait_for("attempt 1 to connect every rank", lambda: connected(job_dir, 1), procs=(node0,))
    killed_at = time.time()
    node1.kill()
    finish([node1])
    failure = wait_for("the lost node to be noticed", lambda: first_failure(job_dir), procs=(node0,))
    message = failure["failure"]["message"]
    assert failure["rank"] in (2, 3)
    # Its ranks die with it (PR_SET_PDEATHSIG); whichever the coordinator hears of first names why.
    assert "node 1" in message or "killed by SIGKILL" in message or "dropped its heartbeat" in message, message
    assert failure["time"] - killed_at < HB_TIMEOUT, "a dead agent is noticed at once, not at a timeout"
    replacement = cluster.popen(1, node_argv(1, endpoint, job_dir, *script), **popen_kwargs())
    out0, out1 = finish([node0, replacement])
    assert node0.returncode == 0, out0
    assert replacement.returncode == 0, out1
    assert connected(job_dir, 2)
    assert any(e["type"] == "restarting" for e in events(job_dir))
    # Closed, or reset when the agent died with unread data in its socket.
    assert "node 1 (" in out0 and f"{cluster.address(1)}) lost: its agent" in out0, out0
    assert "waiting up to 60s for node 1 to join (--join-timeout)" in out0


def test_sigterm_on_an_agent_node_stops_its_ranks_and_the_job_waits_for_the_node(tmp_path):
    job_dir = tmp_path / "term"
    endpoint = f"127.0.0.1:{free_port()}"
    script = (WORKER, "--steps", "5", "--until-file", str(tmp_path / "never"), "--until-attempt", "1")
    node0 = subprocess.Popen(node_argv(0, endpoint, job_dir, *script), **popen_kwargs())
    node1 = subprocess.Popen(node_argv(1, endpoint, job_dir, *script), **popen_kwargs())
    wait_for("attempt 1 to connect every rank", lambda: connected(job_dir, 1), procs=(node0,))
    node1.send_signal(signal.SIGTERM)
    [out1] = finish([node1])
    assert node1.returncode == 128 + signal.SIGTERM, out1
    assert "SIGTERM: stopping this node's ranks" in out1
    failure = wait_for("the node's loss", lambda: first_failure(job_dir), procs=(node0,))
    assert failure["failure"]["cause"] in ("node_lost", "signaled", "connection_lost"), failure
    back = subprocess.Popen(node_argv(1, endpoint, job_dir, *script), **popen_kwargs())
    out0, out_back = finish([node0, back])
    assert node0.returncode == 0 and back.returncode == 0, out0 + out_back


def test_a_frozen_host_is_lost_at_heartbeat_timeout_and_rejoins_when_it_thaws(tmp_path, cluster):
    job_dir = tmp_path / "frozen"
    endpoint = f"{cluster.address(0)}:{PORT}"
    script = (WORKER, "--steps", "5", "--until-file", str(tmp_path / "never"), "--until-attempt", "1")
    node0 = cluster.popen(0, node_argv(0, endpoint, job_dir, *script), **popen_kwargs())
    node1 = cluster.popen(1, node_argv(1, endpoint, job_dir, *script), **popen_kwargs())
    wait_for("attempt 1 to connect every rank", lambda: connected(job_dir, 1), procs=(node0,))
    host1 = cluster.pids()[cluster.namespace(1)]
    assert node1.pid in host1 and len(host1) == 3  # the agent and its two ranks
    signal_all(host1, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        failure = wait_for("the frozen node to be noticed", lambda: first_failure(job_dir), procs=(node0,))
        detected = failure["time"] - stopped_at
        message = failure["failure"]["message"]
        assert "node 1" in message or "stopped sending heartbeats" in message, message
        # Not before the timeout (the last heartbeat was at most an interval before the stop), not much after.
        assert HB_TIMEOUT - 2 * INTERVAL <= detected <= HB_TIMEOUT + 3.0, detected
    finally:
        signal_all(host1, signal.SIGCONT)
    # Thawed: an agent already declared lost kills its ranks and rejoins; one that thawed
    # first carries on, and the coordinator stops its written-off ranks through it.
    out0, out1 = finish([node0, node1])
    assert node0.returncode == 0, out0
    assert node1.returncode == 0, out1
    assert connected(job_dir, 2)


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass  # already ended: nothing to stop or resume


def test_a_partitioned_host_stops_its_ranks_and_rejoins_after_healing_with_no_duplicate(tmp_path, cluster):
    job_dir, record = tmp_path / "partition", tmp_path / "record"
    record.mkdir()
    endpoint = f"{cluster.address(0)}:{PORT}"
    script = (WORKER, "--steps", "5", "--until-file", str(tmp_path / "never"), "--until-attempt", "1",
              "--record", str(record))
    node0 = cluster.popen(0, node_argv(0, endpoint, job_dir, *script), **popen_kwargs())
    node1 = cluster.popen(1, node_argv(1, endpoint, job_dir, *script), **popen_kwargs())
    wait_for("attempt 1 to connect every rank", lambda: connected(job_dir, 1), procs=(node0,))
    cut_at = time.time()
    cluster.partition(1)
    try:
        failure = wait_for("the partitioned node to be noticed", lambda: first_failure(job_dir), procs=(node0,))
        detected = failure["time"] - cut_at
        assert HB_TIMEOUT - 2 * INTERVAL <= detected <= HB_TIMEOUT + 3.0, detected
        # Cut off, the host's ranks stop (they hear no answer; the agent, no frame): only its agent is left.
        wait_for("node 1's ranks to stop themselves", lambda: cluster.pids().get(cluster.namespace(1)) == [node1.pid],
                 timeout=HB_TIMEOUT + 10)
        # Attempt 2 waits for node 1: node 0's half may run, node 1's has not started.
        assert not (record / "r2_a2.json").exists() and not (record / "r3_a2.json").exists()
    finally:
        cluster.heal(1)
    out0, out1 = finish([node0, node1])
    assert node0.returncode == 0, out0
    assert node1.returncode == 0, out1
    # One process per rank and attempt: attempt 1's node-1 ranks were gone before attempt 2's started.
    runs = sorted(p.name for p in record.iterdir())
    assert runs == [f"r{r}_a{a}.json" for r in range(4) for a in (1, 2)], runs
    assert "rejoining" in out1


DDP = os.path.join(SCRIPTS, "ddp_resume.py")


@pytest.mark.torch
@pytest.mark.timeout(200)
def test_a_two_node_ddp_job_survives_losing_a_node_and_ends_with_a_verified_checkpoint(tmp_path, cluster):
    pytest.importorskip("torch")
    import torch

    from rankwarden.checkpoint import CheckpointStore

    job_dir, out, ckpt = tmp_path / "ddp", tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    endpoint = f"{cluster.address(0)}:{PORT}"
    job_id = f"{JOB_PREFIX}{job_dir.name}"
    script = (DDP, "--steps", "40", "--every", "4", "--out", str(out))
    extra = ("--checkpoint", str(ckpt), "--no-warm")
    # gloo finds its peers by interface: each "host" has its own.
    node_env = [env(GLOO_SOCKET_IFNAME="br0", RW_TEST_STEP_TIME="0.1"),
                env(GLOO_SOCKET_IFNAME="eth0", RW_TEST_STEP_TIME="0.1")]
    kwargs = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    argv = [node_argv(k, endpoint, job_dir, *script, nproc=1, extra=extra) for k in (0, 1)]
    for k in (0, 1):  # heavier ranks: a loaded 2-core host must not look frozen
        argv[k][argv[k].index("--heartbeat-timeout") + 1] = "10"
        argv[k][argv[k].index("--heartbeat-interval") + 1] = "0.5"
    node0 = cluster.popen(0, argv[0], env=node_env[0], **kwargs)
    node1 = cluster.popen(1, argv[1], env=node_env[1], **kwargs)
    store = CheckpointStore(str(ckpt), job_id)
    wait_for("a committed checkpoint", lambda: store.steps(), timeout=100, procs=(node0,))
    node1.kill()  # the whole host: its agent, and with it (PR_SET_PDEATHSIG) its rank
    finish([node1])
    replacement = cluster.popen(1, argv[1], env=node_env[1], **kwargs)
    out0, out1 = finish([node0, replacement], timeout=150)
    assert node0.returncode == 0, out0
    assert replacement.returncode == 0, out1
    resumed = [json.loads((out / f"run_resume_r{r}.json").read_text())["resumed_from"] for r in (0, 1)]
    assert resumed[0] == resumed[1] > 0, resumed  # attempt 2 resumed one committed step on both nodes
    final = [torch.load(out / f"run_final_r{r}.pt") for r in (0, 1)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    latest = store.latest()
    assert latest is not None and latest.step == 40
    store.verify(latest.step, checksums=True)  # raises if any file is damaged


def test_under_srun_the_same_command_with_no_node_flags_runs_on_every_node(tmp_path, cluster):
    job_dir, record = tmp_path / "srun", tmp_path / "record"
    record.mkdir()
    argv = [sys.executable, "-m", "rankwarden", "run", "--nproc-per-node", "1", "--job-dir", str(job_dir),
            "--heartbeat-timeout", str(HB_TIMEOUT), "--stop-grace", "2", WORKER, "--steps", "2", "--record",
            str(record)]
    # What srun sets for a 2-node step (the node list's first host is node 0: here its address).
    slurm = dict(SLURM_STEP_ID="0", SLURM_STEP_NUM_NODES="2", SLURM_JOB_ID="4242",
                 SLURM_STEP_NODELIST=f"{cluster.address(0)},{cluster.address(1)}")
    nodes = [cluster.popen(k, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=env(SLURM_NODEID=str(k), **slurm)) for k in (1, 0)]
    outputs = finish(nodes)
    assert [p.returncode for p in nodes] == [0, 0], outputs
    envs = [json.loads((record / f"r{r}_a1.json").read_text())["env"] for r in (0, 1)]
    assert [(e["GROUP_RANK"], e["WORLD_SIZE"], e["MASTER_ADDR"]) for e in envs] == [
        ("0", "2", cluster.address(0)), ("1", "2", cluster.address(0))]
    assert f"agents join at {cluster.address(0)}:29400" in outputs[1]


SHARDED = os.path.join(SCRIPTS, "sharded_train.py")


@pytest.fixture
def cluster3():
    made = Cluster(nodes=2)
    try:
        yield made
    finally:
        left = made.close()
    assert not left, f"processes left on the test hosts: {left}"


@pytest.mark.torch
@pytest.mark.timeout(240)
def test_an_elastic_job_loses_a_node_and_finishes_on_the_rest_resuming_its_sharded_checkpoint(tmp_path, cluster3):
    # --nnodes 2:3 on three hosts, one rank each: node 2 is killed (its agent and, through
    # PR_SET_PDEATHSIG, its rank) after a committed step; attempt 2 runs at once on nodes 0
    # and 1 at world size 2 and resumes that step resharded (DCP), with no wait for node 2.
    pytest.importorskip("torch")
    from rankwarden.checkpoint import CheckpointStore

    cluster = cluster3
    job_dir, out, ckpt = tmp_path / "elastic", tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    endpoint = f"{cluster.address(0)}:{PORT}"
    job_id = f"{JOB_PREFIX}{job_dir.name}"
    script = (SHARDED, "--steps", "24", "--every", "4", "--mode", "ddp", "--out", str(out))
    extra = ("--checkpoint", str(ckpt), "--no-warm", "--last-call-timeout", "60")
    kwargs = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    node_env = [env(GLOO_SOCKET_IFNAME="br0" if k == 0 else "eth0", RW_TEST_STEP_TIME="0.25") for k in range(3)]
    argv = [node_argv(k, endpoint, job_dir, *script, nproc=1, extra=extra) for k in range(3)]
    for k in range(3):
        argv[k][argv[k].index("--nnodes") + 1] = "2:3"
        argv[k][argv[k].index("--heartbeat-timeout") + 1] = "10"  # torch ranks on a loaded 2-core host
        argv[k][argv[k].index("--heartbeat-interval") + 1] = "0.5"
    nodes = [cluster.popen(k, argv[k], env=node_env[k], **kwargs) for k in range(3)]
    store = CheckpointStore(str(ckpt), job_id)
    try:
        wait_for("a committed checkpoint", lambda: store.steps(), timeout=150, procs=(nodes[0],))
    except BaseException:
        for proc in nodes:
            proc.kill()
        raise
    nodes[2].kill()
    finish([nodes[2]])
    out0, out1 = finish(nodes[:2], timeout=150)
    assert nodes[0].returncode == 0, out0
    assert nodes[1].returncode == 0, out1
    # The world size each rank ran at, as torch.distributed saw it.
    logs = {p.name: [json.loads(line) for line in p.read_text().splitlines()] for p in out.glob("run_log_*.jsonl")}
    assert sorted(logs) == ["run_log_r0_a1.jsonl", "run_log_r0_a2.jsonl", "run_log_r1_a1.jsonl",
                            "run_log_r1_a2.jsonl", "run_log_r2_a1.jsonl"], sorted(logs)
    assert {name: log[0]["world"] for name, log in logs.items()} == {
        "run_log_r0_a1.jsonl": 3, "run_log_r1_a1.jsonl": 3, "run_log_r2_a1.jsonl": 3,
        "run_log_r0_a2.jsonl": 2, "run_log_r1_a2.jsonl": 2}
    resumed = {logs[f"run_log_r{r}_a2.jsonl"][0]["resumed_from"] for r in (0, 1)}
    assert len(resumed) == 1 and resumed.pop() > 0  # one committed step, on both ranks
    assert "final_eval" in logs["run_log_r0_a2.jsonl"][-1]
    assert "attempt 1 runs on 3 of 3 nodes (0, 1, 2): world size 3" in out0, out0
    assert "node 2 lost; attempt 2 continues on 2 of 3 nodes (0, 1): world size 3 -> 2" in out0, out0
    assert "waiting up to" not in out0  # no join timeout was waited for node 2
    assert "written by 3 rank(s), resharded on load" in out0, out0
    latest = store.latest()
    assert latest is not None and latest.step == 24
    assert store.verify(latest.step, checksums=True).world_size == 2


def test_an_elastic_job_goes_on_without_a_partitioned_node_with_torchruns_env_for_the_smaller_world(
        tmp_path, cluster3):
    # --nnodes 2:3, one rank per host; node 2 is cut off. It is written off at the heartbeat
    # timeout and attempt 2 runs on nodes 0 and 1 without waiting for it; node 2's agent
    # gives up after its own --join-timeout (5 s here), exits 75 and leaves nothing behind.
    cluster = cluster3
    job_dir, record, until = tmp_path / "elastic-cut", tmp_path / "record", tmp_path / "until"
    record.mkdir()
    endpoint = f"{cluster.address(0)}:{PORT}"
    script = (WORKER, "--steps", "3", "--until-file", str(until), "--until-attempt", "0", "--record", str(record))
    argv = [node_argv(k, endpoint, job_dir, *script, nproc=1, extra=("--last-call-timeout", "60")) for k in range(3)]
    for k in range(3):
        argv[k][argv[k].index("--nnodes") + 1] = "2:3"
    argv[2][argv[2].index("--join-timeout") + 1] = "5"
    nodes = [cluster.popen(k, argv[k], **popen_kwargs()) for k in range(3)]
    try:
        wait_for("attempt 1 to connect every rank", lambda: connected(job_dir, 1, ranks=3), procs=(nodes[0],))
        cut_at = time.time()
        cluster.partition(2)
        failure = wait_for("the partitioned node to be noticed", lambda: first_failure(job_dir), procs=(nodes[0],))
        assert HB_TIMEOUT - 2 * INTERVAL <= failure["time"] - cut_at <= HB_TIMEOUT + 3.0, failure
        wait_for("attempt 2 to connect its 2 ranks", lambda: connected(job_dir, 2, ranks=2), procs=(nodes[0],))
        until.write_text("")
        out0, out1, out2 = finish(nodes)
    finally:
        cluster.heal(2)
        for proc in nodes:
            proc.kill()
    assert nodes[0].returncode == 0, out0
    assert nodes[1].returncode == 0, out1
    assert nodes[2].returncode == 75, out2  # cut off for its whole --join-timeout
    keys = ("RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE",
            "ROLE_WORLD_SIZE")
    runs = sorted(p.name for p in record.iterdir())
    assert runs == ["r0_a1.json", "r0_a2.json", "r1_a1.json", "r1_a2.json", "r2_a1.json"], runs
    for rank in (0, 1):
        rank_env = json.loads((record / f"r{rank}_a2.json").read_text())["env"]
        assert {k: rank_env[k] for k in keys} == {
            "RANK": str(rank), "LOCAL_RANK": "0", "GROUP_RANK": str(rank), "ROLE_RANK": str(rank),
            "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "GROUP_WORLD_SIZE": "2", "ROLE_WORLD_SIZE": "2"}
        assert rank_env["MASTER_ADDR"] == cluster.address(0)
    first = json.loads((record / "r2_a1.json").read_text())["env"]
    assert (first["WORLD_SIZE"], first["GROUP_WORLD_SIZE"], first["GROUP_RANK"]) == ("3", "3", "2")
    assert "node 2 lost; attempt 2 continues on 2 of 3 nodes (0, 1): world size 3 -> 2" in out0, out0
    assert "waiting up to" not in out0
    assert [e["world_size"] for e in events(job_dir) if e["type"] == "attempt_started"] == [3, 2]
