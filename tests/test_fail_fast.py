"""Fail fast: a bad entrypoint is refused before any attempt; the same failure
before the first step in two attempts stops the job (MockClock, exact times)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import trio

from rankwarden.cli import check_entrypoint
from rankwarden.events import JobFailedEvent, Restarting
from rankwarden.spec import JobSpec

from .conftest import JOB_PREFIX
from .test_coordinator_timing import Run, make_spec

TRACEBACK = "Traceback (most recent call last):\n  File \"train.py\", line 1, in <module>\nModuleNotFoundError: No module named 'foo'\n"


def writes_then_exits(text_for_attempt, *, step=None):
    async def rank(fake):
        with open(fake.request.stderr_path, "a") as f:
            f.write(text_for_attempt(fake.request.attempt))
        if step is not None:
            await fake.hello()
            await fake.heartbeat(step)
            await trio.sleep(0.5)
        return 1

    return rank


async def test_the_same_failure_before_the_first_step_twice_stops_the_job(tmp_path, autojump_clock):
    run = await Run(make_spec(tmp_path, max_restarts=5), writes_then_exits(lambda attempt: TRACEBACK))()
    assert run.snapshot.state.value == "failed"
    assert run.times(Restarting) == [0.0]  # one restart (backoff 1 s), not five
    assert run.times(JobFailedEvent) == [1.0]
    [(_, failed)] = [(t, e) for t, e in run.timeline if isinstance(e, JobFailedEvent)]
    # Which rank's exit is seen first is not the point (both fail alike).
    assert re.fullmatch(
        r"job t-fake failed: configuration error: rank [01] failed the same way before its first step in attempts 1 "
        r"and 2 \(exit code 1: ModuleNotFoundError: No module named 'foo'\); restarting cannot fix that, so the job "
        r"stops with 4 restart\(s\) unused. Fix the command and run it again", failed.message)


async def test_different_failures_spend_the_budget(tmp_path, autojump_clock):
    run = await Run(make_spec(tmp_path), writes_then_exits(lambda attempt: f"error in attempt {attempt}\n"))()
    assert run.times(Restarting) == [0.0, 1.0]
    assert run.times(JobFailedEvent) == [3.0]
    assert "restart budget spent (2 of 2 restarts used)" in run.timeline[-1][1].message


async def test_a_rank_that_made_progress_is_not_a_configuration_error(tmp_path, autojump_clock):
    run = await Run(make_spec(tmp_path, world_size=1), writes_then_exits(lambda attempt: TRACEBACK, step=3))()
    assert run.times(Restarting) == [0.5, 2.0]
    assert "restart budget spent" in run.timeline[-1][1].message


async def test_rank_scope_stops_a_rank_that_cannot_start(tmp_path, autojump_clock):
    run = await Run(make_spec(tmp_path, restart_scope="rank", max_restarts=5),
                    writes_then_exits(lambda attempt: TRACEBACK))()
    assert run.snapshot.state.value == "failed"
    assert "configuration error: rank" in run.timeline[-1][1].message
    assert run.snapshot.restarts_used < 5


def spec(entrypoint, **kw):
    return JobSpec.from_dict(dict(entrypoint=entrypoint, **kw))


@pytest.mark.parametrize("entrypoint, kw, problem", [
    ("missing.py", {}, "missing.py: no such file"),
    ("missing_module", {}, "missing_module: no such file (a module? add -m)"),
    ("no_such_pkg_xyz.train", dict(module=True), "-m no_such_pkg_xyz.train: no module named 'no_such_pkg_xyz.train'"),
    ("json.no_such_sub", dict(module=True), "-m json.no_such_sub: no module named 'json.no_such_sub'"),
    ("json.decoder.x", dict(module=True), "-m json.decoder.x: json.decoder is a module, not a package"),
    ("no-such-command-xyz", dict(no_python=True), "no-such-command-xyz: no such executable"),
])
def test_a_bad_entrypoint_is_named(entrypoint, kw, problem):
    assert check_entrypoint(spec(entrypoint, **kw)).startswith(problem)


@pytest.mark.parametrize("entrypoint, kw", [
    ("tests/scripts/worker.py", {}), ("json.tool", dict(module=True)), ("tests.scripts", dict(module=True)),
    ("true", dict(no_python=True)),
])
def test_a_good_entrypoint_passes_without_being_imported(entrypoint, kw):
    before = set(sys.modules)
    assert check_entrypoint(spec(entrypoint, **kw)) is None
    assert not {m for m in set(sys.modules) - before if m.startswith(("json.tool", "tests.scripts"))}


def test_a_missing_script_costs_no_attempt(tmp_path):
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "rankwarden", "run", "--job-dir", str(tmp_path / "job"),
                             "--run-id", f"{JOB_PREFIX}ff-missing", "nope.py"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "rankwarden run: error: nope.py: no such file; nothing was started\n"
    assert not (tmp_path / "job").exists()
    assert time.monotonic() - started < 10


def test_an_import_error_stops_after_the_second_attempt(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text("import no_such_module_for_rankwarden\n")
    result = subprocess.run([sys.executable, "-m", "rankwarden", "run", "--nproc-per-node", "2", "--max-restarts", "5",
                             "--backoff-initial", "0.05", "--job-dir", str(tmp_path / "job"), "--run-id",
                             f"{JOB_PREFIX}ff-import", str(script)], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 1
    assert re.search(r"configuration error: rank [01] failed the same way before its first step in attempts 1 and 2",
                     result.stderr)
    assert "No module named 'no_such_module_for_rankwarden'" in result.stderr
    assert "restarting all ranks" in result.stderr and "restart 2 of 5" not in result.stderr
