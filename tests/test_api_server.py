"""`rankwarden serve` as a real process: SIGKILL it mid-job, start it again; schemathesis against it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import httpx
import pytest
import trio

from rankwarden.checkpoint import CheckpointStore

from .conftest import JOB_PREFIX, SCRIPTS

WORKER = os.path.join(SCRIPTS, "worker.py")
CKPT_RANK = os.path.join(SCRIPTS, "ckpt_rank.py")
TOKEN = "server-test-token-abcdef"
LIMIT = 60


async def start_server(state_dir, *extra):
    env = dict(os.environ, RANKWARDEN_API_TOKEN=TOKEN)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "rankwarden", "serve", "--port", "0", "--state-dir", str(state_dir),
         "--allow", os.path.join(SCRIPTS, "*"), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
    )
    seen = b""
    with trio.fail_after(LIMIT):
        while not (match := re.search(rb"rankwarden API on (http://\S+)", seen)):
            chunk = await process.stdout.receive_some(4096)
            assert chunk, "server exited before listening"
            seen += chunk
    return process, match.group(1).decode()


async def stop_server(server):
    """SIGTERM, as an operator would, and wait for the graceful exit."""
    server.send_signal(signal.SIGTERM)
    with trio.fail_after(LIMIT):
        await server.wait()


def client(url):
    return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)


async def wait_for(api, job_id, predicate):
    with trio.fail_after(LIMIT):
        while True:
            response = await api.get(f"/jobs/{job_id}")
            if response.status_code == 200 and predicate(response.json()):
                return response.json()
            await trio.sleep(0.1)


@pytest.mark.parametrize("policy, final", [("resume", "succeeded"), ("interrupt", "interrupted")])
async def test_sigkill_of_the_server_loses_no_job(tmp_path, policy, final):
    state = tmp_path / "state"
    server, url = await start_server(state, "--on-restart", policy)
    job_id = f"{JOB_PREFIX}srv-{policy}"
    async with client(url) as api:
        body = {"entrypoint": WORKER, "args": ["--steps", "60", "--step-time", "0.05"], "world_size": 2,
                "job_id": job_id, "heartbeat_timeout": 3.0}
        assert (await api.post("/jobs", json=body)).status_code == 201
        await wait_for(api, job_id, lambda j: j["state"] == "running")
    server.kill()  # no goodbye: the database must already hold the job
    with trio.fail_after(LIMIT):
        await server.wait()
    server, url = await start_server(state, "--on-restart", policy)
    try:
        async with client(url) as api:
            info = await wait_for(api, job_id, lambda j: j["state"] == final)
            if policy == "resume":
                assert info["reason"] == "resumed after a server restart"
                lines = (await api.get(f"/jobs/{job_id}/logs", params={"lines": 100000})).json()["lines"]
                assert sum("done after 60 steps" in l["line"] for l in lines) == 2
            else:
                assert "the server stopped while the job was running" in info["reason"]
            listed = (await api.get("/jobs")).json()
            assert [j["job_id"] for j in listed["jobs"]] == [job_id]
    finally:
        await stop_server(server)


async def test_a_token_is_generated_once_with_mode_0600(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RANKWARDEN_API_TOKEN"}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "rankwarden", "serve", "--port", "0", "--state-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    seen = b""
    with trio.fail_after(LIMIT):
        while b"API token" not in seen:
            seen += await process.stdout.receive_some(4096)
    process.send_signal(signal.SIGINT)
    with trio.fail_after(LIMIT):
        assert await process.wait() == 0
    token_file = tmp_path / "api-token"
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    assert token_file.read_text().strip() in seen.decode()


@pytest.mark.skipif(shutil.which("schemathesis") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "schemathesis")), reason="schemathesis is not installed")
async def test_schemathesis_finds_no_5xx_and_no_schema_violations(tmp_path):
    server, url = await start_server(tmp_path / "state")
    try:
        st = os.path.join(os.path.dirname(sys.executable), "schemathesis")
        result = await trio.run_process(
            [st, "run", f"{url}/openapi.json", "--header", f"Authorization: Bearer {TOKEN}",
             "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance",
             "--max-examples", "25", "--exclude-path-regex", "/stream$", "--seed", "1"],
            capture_stdout=True, capture_stderr=True, check=False)
        output = result.stdout.decode() + result.stderr.decode()
        assert result.returncode == 0, output[-6000:]
    finally:
        await stop_server(server)


async def test_the_jobs_cli_drives_a_server(tmp_path):
    server, url = await start_server(tmp_path / "state")
    env = dict(os.environ, RANKWARDEN_URL=url, RANKWARDEN_API_TOKEN=TOKEN)
    jobs = [sys.executable, "-m", "rankwarden", "jobs"]
    try:
        with trio.fail_after(LIMIT):
            submitted = await trio.run_process([*jobs, "submit", "--nproc-per-node", "2", "--job-id", f"{JOB_PREFIX}cli-jobs",
                                                WORKER, "--steps", "5"], capture_stdout=True, env=env)
            assert b'"state": "pending"' in submitted.stdout
            followed = await trio.run_process([*jobs, "logs", "-f", f"{JOB_PREFIX}cli-jobs"], capture_stdout=True, env=env)
            assert b"[rank0]: rank 0 done after 5 steps" in followed.stdout
            async with client(url) as api:
                await wait_for(api, f"{JOB_PREFIX}cli-jobs", lambda j: j["state"] == "succeeded")
            listed = await trio.run_process([*jobs, "list"], capture_stdout=True, env=env)
            assert b"succeeded" in listed.stdout
            missing = await trio.run_process([*jobs, "stop", "no-such-job"], capture_stderr=True, env=env, check=False)
            assert missing.returncode == 1 and b"404: no job no-such-job" in missing.stderr
    finally:
        await stop_server(server)


async def sigkill(server):
    server.kill()
    with trio.fail_after(LIMIT):
        await server.wait()


async def test_a_crash_during_a_graceful_stop_keeps_the_stop(tmp_path):
    state = tmp_path / "state"
    server, url = await start_server(state)
    job_id = f"{JOB_PREFIX}srv-stop-crash"
    async with client(url) as api:
        body = {"entrypoint": WORKER, "args": ["--steps", "100000", "--step-time", "0.05"], "job_id": job_id,
                "heartbeat_timeout": 3.0, "checkpoint": False}
        assert (await api.post("/jobs", json=body)).status_code == 201
        await wait_for(api, job_id, lambda j: j["state"] == "running")
        assert (await api.post(f"/jobs/{job_id}/stop")).status_code == 202
    await sigkill(server)  # while the ranks drain
    server, url = await start_server(state)
    try:
        async with client(url) as api:
            info = await wait_for(api, job_id, lambda j: j["state"] in ("stopped", "running", "succeeded"))
            assert info["state"] == "stopped" and "stopped through the API" in info["reason"]
    finally:
        await stop_server(server)


async def test_attempts_and_the_restart_budget_survive_a_server_restart(tmp_path):
    state = tmp_path / "state"
    server, url = await start_server(state)
    job_id = f"{JOB_PREFIX}srv-budget"
    body = {"entrypoint": WORKER, "args": ["--steps", "1000", "--step-time", "0.05", "--fail-rank", "0",
                                           "--fail-attempt", "0", "--fail-step", "20"],
            "job_id": job_id, "heartbeat_timeout": 3.0, "checkpoint": False, "max_restarts": 2}
    async with client(url) as api:
        assert (await api.post("/jobs", json=body)).status_code == 201
        await wait_for(api, job_id, lambda j: j["restarts_used"] == 1 and j["state"] == "running")
    await sigkill(server)  # during attempt 2, with one restart left
    server, url = await start_server(state)
    try:
        async with client(url) as api:
            info = await wait_for(api, job_id, lambda j: j["state"] in ("failed", "succeeded"))
            assert (info["state"], info["restarts_used"], info["attempt"]) == ("failed", 2, 4)
            lines = (await api.get(f"/jobs/{job_id}/logs", params={"lines": 100000})).json()["lines"]
            # The resumed job went on with attempt 3, not a fresh 1: no attempt
            # number is used twice (attempt 2 may have died before its first line).
            ready = [l["attempt"] for l in lines if "ready" in l["line"]]
            assert len(ready) == len(set(ready)) and {1, 3, 4} <= set(ready) <= {1, 2, 3, 4}, ready
    finally:
        await stop_server(server)


async def test_state_files_are_private_and_ranks_never_see_the_api_token(tmp_path):
    state = tmp_path / "state"
    record = tmp_path / "record"
    record.mkdir()
    server, url = await start_server(state)
    job_id = f"{JOB_PREFIX}srv-private"
    try:
        async with client(url) as api:
            body = {"entrypoint": WORKER, "args": ["--steps", "2", "--record", str(record)], "job_id": job_id,
                    "checkpoint": False}
            assert (await api.post("/jobs", json=body)).status_code == 201
            await wait_for(api, job_id, lambda j: j["state"] == "succeeded")
    finally:
        await stop_server(server)
    env = json.loads((record / "r0_a1.json").read_text())["env"]
    assert "RANKWARDEN_API_TOKEN" not in env and TOKEN not in json.dumps(env)
    assert os.stat(state).st_mode & 0o777 == 0o700
    assert os.stat(state / "jobs.sqlite3").st_mode & 0o777 == 0o600
    job_dir = state / "jobs" / job_id
    assert os.stat(job_dir).st_mode & 0o777 == 0o700
    for path in job_dir.rglob("*"):
        assert os.stat(path).st_mode & 0o077 == 0, (path, oct(os.stat(path).st_mode))


async def test_a_token_file_others_can_read_is_refused(tmp_path):
    (tmp_path / "api-token").write_text("a-token-someone-else-may-have-read\n")
    os.chmod(tmp_path / "api-token", 0o644)
    env = {k: v for k, v in os.environ.items() if k != "RANKWARDEN_API_TOKEN"}
    with trio.fail_after(LIMIT):
        result = await trio.run_process(
            [sys.executable, "-m", "rankwarden", "serve", "--port", "0", "--state-dir", str(tmp_path)],
            capture_stdout=True, capture_stderr=True, env=env, check=False)
    assert result.returncode == 2
    assert b"has mode 0644" in result.stderr and b"chmod 600" in result.stderr


async def test_a_weak_token_is_refused_on_a_public_bind(tmp_path):
    env = dict(os.environ, RANKWARDEN_API_TOKEN="change-me")
    with trio.fail_after(LIMIT):
        result = await trio.run_process(
            [sys.executable, "-m", "rankwarden", "serve", "--host", "0.0.0.0", "--port", "0",
             "--state-dir", str(tmp_path)], capture_stdout=True, capture_stderr=True, env=env, check=False)
    assert result.returncode == 2 and b"weak API token" in result.stderr


async def test_the_jobs_cli_is_pleasant(tmp_path):
    jobs = [sys.executable, "-m", "rankwarden", "jobs"]
    # Nothing listens on this port: one line, no traceback.
    down = dict(os.environ, RANKWARDEN_URL="http://127.0.0.1:9", RANKWARDEN_API_TOKEN=TOKEN)
    with trio.fail_after(LIMIT):
        result = await trio.run_process([*jobs, "list"], capture_stderr=True, env=down, check=False)
    assert result.returncode == 1
    assert result.stderr.decode().strip() == "rankwarden jobs list: cannot reach http://127.0.0.1:9: connection refused"

    server, url = await start_server(tmp_path / "state")
    env = dict(os.environ, RANKWARDEN_URL=url, RANKWARDEN_API_TOKEN=TOKEN)
    job_id = f"{JOB_PREFIX}cli-nice"
    try:
        with trio.fail_after(LIMIT):
            # A relative entrypoint means the caller's directory, not the server's.
            submitted = await trio.run_process(
                [*jobs, "submit", "--job-id", job_id, "--max-restarts", "1", "--heartbeat-timeout", "4",
                 "--total-steps", "30", "--no-checkpoint", "worker.py", "--steps", "30", "--step-time", "0.02",
                 "--fail-rank", "0", "--fail-step", "5"], capture_stdout=True, env=env, cwd=SCRIPTS)
            request = json.loads(submitted.stdout)["request"]
            assert request["entrypoint"] == os.path.realpath(WORKER)
            assert (request["heartbeat_timeout"], request["total_steps"], request["checkpoint"]) == (4.0, 30, False)
            followed = await trio.run_process([*jobs, "logs", "-f", job_id], capture_stdout=True, env=env)
            out = followed.stdout.decode()
            assert "-- restarting:" in out and "[rank0]: rank 0 done after 30 steps" in out
            assert out.rstrip().endswith(f"-- job {job_id}: succeeded")
            shown = await trio.run_process([*jobs, "show", job_id], capture_stdout=True, env=env)
            assert shown.stdout.decode().startswith(f"{job_id}: succeeded, attempt 2, restarts 1/1")
            as_json = await trio.run_process([*jobs, "show", "--json", job_id], capture_stdout=True, env=env)
            assert json.loads(as_json.stdout)["state"] == "succeeded"
            piped = await trio.run_process(
                ["sh", "-c", f"'{sys.executable}' -m rankwarden jobs logs --lines 1000 {job_id} | head -1"],
                capture_stdout=True, capture_stderr=True, env=env)
            assert piped.stderr == b"" and piped.stdout.startswith(b"[rank")
    finally:
        await stop_server(server)


async def test_a_job_resumed_after_a_server_restart_continues_from_its_checkpoint(tmp_path):
    state, out = tmp_path / "state", tmp_path / "out"
    out.mkdir()
    server, url = await start_server(state)
    job_id = f"{JOB_PREFIX}srv-ckpt"
    body = {"entrypoint": CKPT_RANK, "args": ["--steps", "60", "--step-time", "0.05", "--out", str(out)],
            "world_size": 2, "job_id": job_id, "heartbeat_timeout": 3.0}
    async with client(url) as api:
        assert (await api.post("/jobs", json=body)).status_code == 201
        with trio.fail_after(LIMIT):
            while ((await api.get(f"/jobs/{job_id}/summary")).json().get("checkpoint_step") or 0) < 5:
                await trio.sleep(0.05)
    await sigkill(server)  # mid-job: ranks lose their coordinator and exit
    committed_before = CheckpointStore(str(state / "checkpoints"), job_id).latest().step
    server, url = await start_server(state)
    try:
        async with client(url) as api:
            info = await wait_for(api, job_id, lambda j: j["state"] in ("succeeded", "failed"))
            assert (info["state"], info["reason"]) == ("succeeded", "resumed after a server restart")
        events = [json.loads(line) for line in (state / "jobs" / job_id / "events.jsonl").read_text().splitlines()]
        chosen = [e for e in events if e["type"] == "resume_chosen"]
        # First start: nothing to resume. After the restart: the newest commit, for both ranks.
        assert chosen[0]["step"] is None and chosen[-1]["step"] >= committed_before >= 5
        last = max(int(p.stem.rsplit("_a", 1)[1]) for p in out.glob("resume_r0_a*.json"))
        resumed = [json.loads((out / f"resume_r{r}_a{last}.json").read_text())["resumed_from"] for r in (0, 1)]
        assert resumed == [chosen[-1]["step"]] * 2
    finally:
        await stop_server(server)


async def test_deleting_a_job_deletes_its_checkpoints_and_a_new_job_with_its_id_starts_fresh(tmp_path):
    state, out = tmp_path / "state", tmp_path / "out"
    out.mkdir()
    server, url = await start_server(state)
    job_id = f"{JOB_PREFIX}srv-del"
    body = {"entrypoint": CKPT_RANK, "args": ["--steps", "3", "--out", str(out)], "world_size": 2, "job_id": job_id}
    try:
        async with client(url) as api:
            assert (await api.post("/jobs", json=body)).status_code == 201
            await wait_for(api, job_id, lambda j: j["state"] == "succeeded")
            store = CheckpointStore(str(state / "checkpoints"), job_id)
            assert store.latest().step == 3
            deleted = await api.delete(f"/jobs/{job_id}")
            assert deleted.status_code == 200
            assert deleted.json() == {"job_id": job_id, "checkpoints": "deleted",
                                      "checkpoint_url": f"{state / 'checkpoints'}/{job_id}"}
            assert store.steps() == [] and not (state / "checkpoints" / job_id).exists()

            # The same id again: a new job, trained from step 0 (not "resumed at step 3, 0 steps trained").
            assert (await api.post("/jobs", json=body)).status_code == 201
            await wait_for(api, job_id, lambda j: j["state"] == "succeeded")
            events = (state / "jobs" / job_id / "events.jsonl").read_text()
            assert '"type":"resume_chosen"' in events and '"message":"starting from scratch' in events
            assert json.loads((out / "resume_r0_a1.json").read_text())["resumed_from"] == 0
            # A job without checkpoints says so.
            plain = {**body, "job_id": f"{JOB_PREFIX}srv-del2", "checkpoint": False,
                     "entrypoint": WORKER, "args": ["--steps", "1"]}
            assert (await api.post("/jobs", json=plain)).status_code == 201
            await wait_for(api, plain["job_id"], lambda j: j["state"] == "succeeded")
            assert (await api.delete(f"/jobs/{plain['job_id']}")).json()["checkpoints"] == "none"
    finally:
        await stop_server(server)
