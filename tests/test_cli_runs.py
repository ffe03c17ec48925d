"""`rankwarden run` from a new user's side: where files go, resuming, and what the console says."""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys

import pytest
import trio

from .conftest import JOB_PREFIX, SCRIPTS

WORKER = os.path.join(SCRIPTS, "worker.py")
SAVE_RESTORE = os.path.join(SCRIPTS, "save_restore.py")
RANKWARDEN = [sys.executable, "-m", "rankwarden"]
FAST = ["--heartbeat-timeout", "2", "--heartbeat-interval", "0.1", "--backoff-initial", "0.05"]


def run(tmp_path, *args, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "RANKWARDEN_JOBS_DIR": str(tmp_path / "jobs"), "PYTHONPATH": os.getcwd()}
    return subprocess.run([*RANKWARDEN, "run", *args], capture_output=True, text=True, timeout=90, cwd=tmp_path,
                          env=env, **kwargs)


@pytest.mark.torch
def test_save_and_restore_work_without_checkpoint_and_the_same_command_resumes(tmp_path):
    pytest.importorskip("torch")
    job = f"{JOB_PREFIX}cli-default-ckpt"
    first = run(tmp_path, "--nproc-per-node", "2", "--run-id", job, *FAST, SAVE_RESTORE, "--steps", "3")
    assert first.returncode == 0, first.stderr
    job_dir = tmp_path / "jobs" / job
    assert first.stderr.splitlines()[0] == (
        f"rankwarden: job {job}: 2 rank(s) of {SAVE_RESTORE}; logs, events and checkpoints in {job_dir}/ "
        "(--job-dir or $RANKWARDEN_JOBS_DIR moves them)")
    assert "rankwarden: attempt 1: starting from scratch: no committed checkpoint" in first.stderr
    assert "[rank0]: rank 0 fresh start" in first.stdout
    assert (job_dir / "checkpoints" / job / "LATEST").exists()

    again = run(tmp_path, "--nproc-per-node", "2", "--run-id", job, *FAST, SAVE_RESTORE, "--steps", "3")
    assert again.returncode == 0, again.stderr
    assert "rankwarden: attempt 1: resuming from step 3" in again.stderr
    assert "this run's rank output in run_002/" in again.stderr.splitlines()[0]
    # Its own files; nothing of the first run is echoed again.
    assert "fresh start" not in again.stdout
    assert sorted(re.findall(r"\[rank\d\]: rank \d resumed at step 3", again.stdout)) == [
        "[rank0]: rank 0 resumed at step 3", "[rank1]: rank 1 resumed at step 3"]
    assert "resumed at step 3" in (job_dir / "run_002" / "attempt_001" / "rank_0.stdout").read_text()
    assert "resumed" not in (job_dir / "attempt_001" / "rank_0.stdout").read_text()


async def test_interruption_says_how_to_resume(tmp_path):
    job = f"{JOB_PREFIX}cli-resume-hint"
    env = {**os.environ, "RANKWARDEN_JOBS_DIR": str(tmp_path / "jobs")}
    process = await trio.lowlevel.open_process(
        [*RANKWARDEN, "run", "--nproc-per-node", "2", "--run-id", job, *FAST, WORKER, "--steps", "100000",
         "--step-time", "0.01"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    seen = b""
    with trio.fail_after(30):
        while len(re.findall(rb"ready pid", seen)) < 2:
            chunk = await process.stdout.receive_some(4096)
            assert chunk
            seen += chunk
    process.send_signal(signal.SIGINT)
    err = b""
    with trio.fail_after(30):
        while chunk := await process.stderr.receive_some(65536):
            err += chunk
        assert await process.wait() == 130
    await process.stdout.aclose()
    await process.stderr.aclose()
    assert err.decode().splitlines()[-1] == f"rankwarden: resume with: rankwarden run --run-id {job} (same arguments)"


async def test_on_a_terminal_a_ranks_stderr_comes_before_the_restart_it_caused(tmp_path):
    script = tmp_path / "fails_once.py"
    script.write_text(
        "import os, sys\n"
        "rank = os.environ['RANK']\n"
        "if os.environ['TORCHELASTIC_RESTART_COUNT'] == '0' and rank == '1':\n"
        "    print(f'[rank{rank}]: Traceback (most recent call last):', file=sys.stderr)\n"
        "    print(f'[rank{rank}]: RuntimeError: boom', file=sys.stderr)\n"
        "    sys.exit(1)\n"
        "print(f'rank {rank} ok')\n")
    master, slave = pty.openpty()
    try:
        process = await trio.lowlevel.open_process(
            [*RANKWARDEN, "run", "--nproc-per-node", "2", "--run-id", f"{JOB_PREFIX}cli-order", "--job-dir",
             str(tmp_path / "job"), *FAST, str(script)], stdout=slave, stderr=slave, cwd=tmp_path)
        os.close(slave)
        slave = -1
        screen = b""
        with trio.fail_after(60):
            while True:
                await trio.lowlevel.wait_readable(master)
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the other side is closed
                    break
                if not chunk:
                    break
                screen += chunk
            assert await process.wait() == 0
    finally:
        os.close(master)
        if slave != -1:
            os.close(slave)
    # What a person sees: the status line redrawn in place, plain lines above it.
    lines = [line.rsplit("\r\x1b[K", 1)[-1] for line in screen.decode().split("\r\n")]
    boom = lines.index("[rank1]: RuntimeError: boom")
    assert lines[boom - 1] == "[rank1]: Traceback (most recent call last):"  # one prefix, not two
    restarting = next(i for i, line in enumerate(lines) if line.startswith("rankwarden: restarting all ranks"))
    assert boom < restarting
    assert not any("[rank1]: [rank1]:" in line for line in lines)


def test_failure_report_carries_the_failing_ranks_last_stderr_lines(tmp_path):
    result = run(tmp_path, "--nproc-per-node", "2", "--max-restarts", "1", "--quiet", "--run-id",
                 f"{JOB_PREFIX}cli-rootcause", *FAST, WORKER, "--fail-rank", "1", "--fail-attempt", "0")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    root = next(i for i, line in enumerate(lines) if line.startswith("Root cause (first observed failure)"))
    stderr_path = tmp_path / "jobs" / f"{JOB_PREFIX}cli-rootcause" / "attempt_001" / "rank_1.stderr"
    assert lines[root + 1] == f"  last 1 line(s) of rank 1's stderr ({stderr_path}):"
    assert lines[root + 2] == "    rank 1 failing on purpose"


def test_help_shows_each_default_once():
    out = subprocess.run([*RANKWARDEN, "run", "--help"], capture_output=True, text=True, timeout=60).stdout
    flat = " ".join(out.split())
    for name in ("--startup-timeout", "--stop-grace", "--job-dir", "--checkpoint", "--heartbeat-timeout"):
        section = flat.split(name, 1)[1].split(" --", 1)[0]
        assert section.count("default") <= 1, section
    assert "(default: None)" not in flat and "(default: )" not in flat



@pytest.mark.torch
def test_outside_rankwarden_save_and_restore_do_what_the_readme_says(tmp_path):
    pytest.importorskip("torch")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANKWARDEN_CHECKPOINT", "RANKWARDEN_COORDINATOR"))}
    code = ("import sys, rankwarden.worker as rw\n"
            "from rankwarden.errors import CheckpointError\n"
            "try:\n    rw.restore()\nexcept CheckpointError as exc:\n    print('refused:', exc)\n"
            f"assert rw.restore(url={str(tmp_path / 'ck')!r}) is None\n"
            f"rw.save(2, {{'w': 1}}, url={str(tmp_path / 'ck')!r})\n"
            f"print('restored', rw.restore(url={str(tmp_path / 'ck')!r}))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert "refused: no checkpoint URL: without rankwarden pass url= (a directory path works)" in result.stdout
    assert "restored (2, {'w': 1})" in result.stdout
