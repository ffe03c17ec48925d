"""`rankwarden serve` as a real process: SIGKILL it mid-job, start it again; schemathesis against it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

import httpx
import pytest
import trio

from .conftest import JOB_PREFIX, SCRIPTS

WORKER = os.path.join(SCRIPTS, "worker.py")
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
                assert info["reason"] == "" or "resumed" in info["reason"] or info["state"] == "succeeded"
                lines = (await api.get(f"/jobs/{job_id}/logs", params={"lines": 100000})).json()["lines"]
                assert sum("done after 60 steps" in l["line"] for l in lines) == 2
            else:
                assert "the server stopped while the job was running" in info["reason"]
            listed = (await api.get("/jobs")).json()
            assert [j["job_id"] for j in listed["jobs"]] == [job_id]
    finally:
        server.send_signal(signal.SIGTERM)
        with trio.fail_after(LIMIT):
            await server.wait()


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
        server.send_signal(signal.SIGTERM)
        with trio.fail_after(LIMIT):
            await server.wait()


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
        server.send_signal(signal.SIGTERM)
        with trio.fail_after(LIMIT):
            await server.wait()
