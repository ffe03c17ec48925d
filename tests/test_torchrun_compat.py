"""A torchrun user switches in one line: the same command lines, environment and log files."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

from rankwarden._torchrun import IGNORED
from rankwarden.cli import _build_parser, plan_from_args, spec_from_args

from .conftest import JOB_PREFIX, SCRIPTS

WORKER = os.path.join(SCRIPTS, "worker.py")
ENVDUMP = os.path.join(SCRIPTS, "envdump.py")
RANKWARDEN = [sys.executable, "-m", "rankwarden"]
FAST = ["--heartbeat-timeout", "2", "--heartbeat-interval", "0.1", "--backoff-initial", "0.05"]

torch_run = pytest.importorskip("torch.distributed.run")


def _ours():
    return _build_parser()._subparsers._group_actions[0].choices["run"]


# Real torchrun command lines (from the PyTorch docs, HF/Lightning/torchtitan
# READMEs, and both spellings), and what each must mean to rankwarden.
TABLE = [
    ("--standalone --nproc-per-node 4 train.py --lr 3e-4", dict(world_size=4, args=["--lr", "3e-4"])),
    ("--standalone --nproc_per_node=2 train.py", dict(world_size=2)),
    ("--nnodes=1 --nproc_per_node=8 --master_port=29501 train.py --cfg a.yaml", dict(world_size=8, master_port=29501, args=["--cfg", "a.yaml"])),
    ("--nnodes 1:1 --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 29400 train.py", dict(world_size=2, master_port=29400)),
    ("--nproc_per_node=cpu train.py", dict(world_size=len(os.sched_getaffinity(0)))),
    ("--nproc-per-node=auto train.py", dict(world_size=len(os.sched_getaffinity(0)))),
    ("--rdzv_backend=c10d --rdzv_endpoint=localhost:0 --rdzv_id=job1 --nnodes=1 --nproc_per_node=2 train.py", dict(world_size=2, ignored={"rdzv_backend", "rdzv_endpoint", "rdzv_id"})),
    ("--rdzv-backend c10d --rdzv-endpoint localhost:29400 --rdzv-conf timeout=900 --nproc-per-node 2 train.py", dict(world_size=2, ignored={"rdzv_backend", "rdzv_endpoint", "rdzv_conf"})),
    ("--max_restarts=3 --monitor_interval=5 --start_method=fork --nproc_per_node=2 train.py", dict(world_size=2, max_restarts=3, ignored={"monitor_interval", "start_method"})),
    ("--max-restarts 0 --nproc-per-node 1 -m pkg.train --epochs 1", dict(world_size=1, max_restarts=0, module=True, script="pkg.train", args=["--epochs", "1"])),
    ("--no_python --nproc_per_node=2 ./run.sh a b", dict(world_size=2, no_python=True, script="./run.sh", args=["a", "b"])),
    ("--run-path --nproc-per-node 1 /abs/train.py", dict(world_size=1, script="/abs/train.py")),
    ("--log_dir /tmp/logs --tee 3 --redirects 3 --nproc_per_node 2 train.py", dict(world_size=2, log_dir="/tmp/logs")),
    ("--log-dir=/tmp/logs -r 0:1,1:2 -t 0:2 --local_ranks_filter 0 --nproc-per-node 2 train.py", dict(world_size=2, log_dir="/tmp/logs")),
    ("--role trainer --node_rank 0 --nnodes 1 --nproc-per-node 1 train.py", dict(world_size=1, role="trainer", ignored={"node_rank"})),
    ("--event_log_handler console --local_addr 127.0.0.1 --logs_specs default --nproc_per_node 1 train.py", dict(world_size=1, ignored={"event_log_handler", "local_addr", "logs_specs"})),
    ("--signals_to_handle SIGTERM,SIGUSR1 --shutdown_timeout 10 --nproc_per_node 1 train.py", dict(world_size=1, stop_grace=10.0, ignored={"signals_to_handle"})),
    ("--virtual-local-rank --numa-binding node --nproc-per-node 1 train.py", dict(world_size=1, ignored={"virtual_local_rank", "numa_binding"})),
    ("--duplicate_stdout_filters apple,orange --duplicate-stderr-filters err --nproc_per_node 1 train.py", dict(world_size=1, ignored={"duplicate_stdout_filters", "duplicate_stderr_filters"})),
    ("--standalone --nproc-per-node 2 train.py --nproc-per-node 5 --master_port 1", dict(world_size=2, args=["--nproc-per-node", "5", "--master_port", "1"])),
]


@pytest.mark.parametrize("line, expected", TABLE, ids=[row[0][:60] for row in TABLE])
def test_torchrun_command_lines_parse_in_both_and_map(line, expected, tmp_path, monkeypatch):
    monkeypatch.setenv("RANKWARDEN_JOBS_DIR", str(tmp_path))
    argv = shlex.split(line)
    theirs = torch_run.get_args_parser().parse_args(argv)
    ours = _ours().parse_args(argv)
    assert ours.script == theirs.training_script == expected.get("script", "train.py")
    assert ours.script_args == theirs.training_script_args == expected.get("args", [])
    spec = spec_from_args(ours)
    plan = plan_from_args(ours)
    assert spec.world_size == expected["world_size"]
    assert spec.module == bool(theirs.module) == expected.get("module", False)
    assert spec.no_python == bool(theirs.no_python) == expected.get("no_python", False)
    if "max_restarts" in expected:
        assert spec.max_restarts == theirs.max_restarts == expected["max_restarts"]
    assert plan.master_port == theirs.master_port == expected.get("master_port")
    assert spec.env.get("ROLE_NAME", "default") == theirs.role == expected.get("role", "default")
    assert spec.stop_grace == expected.get("stop_grace", 30.0)
    assert (plan.torchrun_logs is not None) == bool(theirs.log_dir) == ("log_dir" in expected)
    ignored = {dest for dest in IGNORED if getattr(ours, dest) is not None and getattr(ours, dest) is not False}
    assert ignored == expected.get("ignored", set())
    assert len(plan.notes) == len(ignored) + (1 if ours.run_path else 0)
    assert spec.checkpoint_url == str(tmp_path.absolute() / spec.job_id / "checkpoints")


def test_every_torchrun_flag_is_accepted_in_every_spelling():
    ours = {option for action in _ours()._actions for option in action.option_strings}
    theirs = {option for action in torch_run.get_args_parser()._actions for option in action.option_strings}
    assert theirs - ours == set()


def test_console_filter_follows_redirects_tee_and_ranks_filter():
    args = _ours().parse_args(shlex.split("-r 3 -t 0:2 --nproc-per-node 2 x.py"))
    echo = plan_from_args(args).echo
    assert [echo(0, "stdout"), echo(0, "stderr"), echo(1, "stdout"), echo(1, "stderr")] == [False, True, False, False]
    echo = plan_from_args(_ours().parse_args(shlex.split("--local-ranks-filter 1 --nproc-per-node 2 x.py"))).echo
    assert [echo(0, "stdout"), echo(1, "stdout"), echo(1, "stderr")] == [False, True, True]


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*RANKWARDEN, "run", *args], capture_output=True, text=True, timeout=90, **kwargs)


def test_nproc_gpu_without_cuda_is_refused_with_torchs_words(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run("--nproc-per-node", "gpu", WORKER, cwd=tmp_path)
    assert result.returncode == 2
    assert "rankwarden run: error: --nproc-per-node gpu: Cuda is not available." in result.stderr


def test_log_dir_tee_and_redirects_write_torchruns_layout(tmp_path):
    logs = tmp_path / "logs"
    result = run("--nproc_per_node=2", "--log_dir", str(logs), "--redirects", "1", "--tee", "0:2",
                 "--master_port", "0", "--job-dir", str(tmp_path / "job"), "--run-id", f"{JOB_PREFIX}tr-logs",
                 "--monitor_interval", "1", *FAST, WORKER, "--steps", "2", "--fail-rank", "0", "--fail-attempt", "1",
                 "--fail-step", "1")
    assert result.returncode == 0, result.stderr
    (run_dir,) = logs.iterdir()
    assert run_dir.name.startswith(f"{JOB_PREFIX}tr-logs_")
    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*.log")) == [
        "attempt_0/0/stderr.log", "attempt_0/0/stdout.log", "attempt_0/1/stdout.log",
        "attempt_1/0/stderr.log", "attempt_1/0/stdout.log", "attempt_1/1/stdout.log",
    ]
    assert "rank 0 failing on purpose" in (run_dir / "attempt_0" / "0" / "stderr.log").read_text()
    assert "rank 1 done after 2 steps" in (run_dir / "attempt_1" / "1" / "stdout.log").read_text()
    # stdout is redirected (files only), rank 0's stderr is teed (file and console).
    assert "[rank" not in result.stdout
    assert "[rank0]: rank 0 failing on purpose" in result.stderr
    assert "ignoring torchrun's --monitor-interval 1.0: exits are seen at once" in result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"rankwarden: job {JOB_PREFIX}tr-logs: 2 rank(s) of {WORKER}; logs, events and checkpoints in ")
    assert f"torchrun's log layout in {run_dir}/" in first


def test_master_port_is_the_first_attempts(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run("--nproc-per-node", "1", "--master-port", str(port), "--max-restarts", "1",
                 "--job-dir", str(tmp_path / "job"), "--run-id", f"{JOB_PREFIX}tr-port", *FAST,
                 WORKER, "--steps", "2", "--fail-rank", "0", "--fail-step", "1")
    assert result.returncode == 0, result.stderr
    ports = [line.split("MASTER_PORT=")[1].rstrip(")") for line in result.stderr.splitlines() if "MASTER_PORT=" in line]
    assert ports[0] == str(port) and ports[1] != str(port)


# What may differ between the launchers, and why.
EXPECTED_DIFFERENCES = {
    "MASTER_PORT": "a free port each",
    "MASTER_ADDR": "torchrun --standalone says localhost, rankwarden --master-addr's 127.0.0.1",
    "TORCHELASTIC_RUN_ID": "torchrun: a UUID; rankwarden: the job id",
    "TORCHELASTIC_ERROR_FILE": "torchrun: a temporary directory; rankwarden: the job directory",
    "TORCHELASTIC_USE_AGENT_STORE": "no agent-hosted TCPStore: rank 0 hosts it",
    "TORCHELASTIC_SIGNALS_TO_HANDLE": "the signals each launcher turns into a stop",
}


def test_a_rank_sees_torchruns_environment(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCH", "PET_", "OMP_NUM"))}
    seen = {}
    for name, cmd in (
        ("torchrun", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]),
        ("rankwarden", [*RANKWARDEN, "run", "--nproc-per-node", "2", "--max-restarts", "0",
                        "--job-dir", str(tmp_path / "job"), "--run-id", f"{JOB_PREFIX}tr-env"]),
    ):
        out = tmp_path / name
        out.mkdir()
        result = subprocess.run([*cmd, ENVDUMP, str(out)], capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        seen[name] = [json.loads((out / f"env_{rank}.json").read_text()) for rank in (0, 1)]
    for rank in (0, 1):
        theirs, ours = seen["torchrun"][rank], seen["rankwarden"][rank]
        assert set(theirs) == set(ours), f"rank {rank}: only torchrun {set(theirs) - set(ours)}, only ours {set(ours) - set(theirs)}"
        differing = {k for k in theirs if theirs[k] != ours[k]}
        assert differing <= set(EXPECTED_DIFFERENCES), {k: (theirs[k], ours[k]) for k in differing}
        assert ours["TORCHELASTIC_ERROR_FILE"] == str(tmp_path / "job" / "attempt_001" / f"rank_{rank}.error.json")
        assert theirs["TORCHELASTIC_ERROR_FILE"].endswith(f"attempt_0/{rank}/error.json")
