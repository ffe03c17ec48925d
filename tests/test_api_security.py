"""Issue 12: the API server is safe to expose. Each test runs a real server on loopback (port 0)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil

import httpx
import pytest
import trio

from rankwarden.api import ServerConfig, serve_api

from .test_api import wait_state
from .conftest import JOB_PREFIX, SCRIPTS

WORKER = os.path.join(SCRIPTS, "worker.py")
TOKEN = "test-token-0123456789abcdef"
LIMIT = 60


@contextlib.asynccontextmanager
async def server(config: ServerConfig, **kwargs):
    """A running server and an authenticated client; a graceful stop at the end."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(functools.partial(serve_api, config, port=0, token=TOKEN, shutdown=stop, **kwargs))
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as client:
            yield client
        stop.set()


def job(name, *args, entrypoint=WORKER, **fields):
    body = {"entrypoint": entrypoint, "args": list(args), "world_size": 1, "job_id": f"{JOB_PREFIX}{name}",
            "heartbeat_timeout": 3.0, "checkpoint": False}
    body.update(fields)
    return body


# -- 1. the allowlist matches path segments of the real path ---------------------------------


@pytest.fixture
def training(tmp_path):
    """/…/srv/train.py, /…/srv/venv/lib/run.py (below the allowed directory) and a symlink to it."""
    srv = tmp_path / "srv"
    (srv / "venv" / "lib").mkdir(parents=True)
    shutil.copy(WORKER, srv / "train.py")
    shutil.copy(WORKER, srv / "venv" / "lib" / "run.py")
    os.symlink(srv / "venv" / "lib" / "run.py", srv / "link.py")
    return srv


@pytest.mark.parametrize("entrypoint, status", [
    ("train.py", 201),
    ("venv/lib/run.py", 403),  # fnmatch's * crossed the '/' here
    ("link.py", 403),  # allowed by name, but its real path is below
])
async def test_a_star_never_crosses_a_directory(tmp_path, training, entrypoint, status):
    config = ServerConfig(state_dir=str(tmp_path / "state"), allow=[str(training / "*.py")])
    async with server(config) as api:
        body = job("glob", "--steps", "1", entrypoint=str(training / entrypoint))
        response = await api.post("/jobs", json=body)
        assert response.status_code == status, response.text
        if status == 201:
            await wait_state(api, body["job_id"], "succeeded")


async def test_a_double_star_crosses_directories_where_written(tmp_path, training):
    config = ServerConfig(state_dir=str(tmp_path / "state"), allow=[str(training / "**" / "run.py")])
    async with server(config) as api:
        body = job("dstar", "--steps", "1", entrypoint=str(training / "venv" / "lib" / "run.py"))
        assert (await api.post("/jobs", json=body)).status_code == 201
        await wait_state(api, body["job_id"], "succeeded")
        assert (await api.post("/jobs", json=job("dstar2", entrypoint=str(training / "train.py")))).status_code == 403


def test_segment_matching():
    from rankwarden.api._admission import path_matches

    assert path_matches("/srv/*.py", "/srv/a.py")
    assert not path_matches("/srv/*.py", "/srv/x/a.py")
    assert path_matches("/srv/**/a.py", "/srv/a.py")
    assert path_matches("/srv/**/a.py", "/srv/x/y/a.py")
    assert not path_matches("/srv/**/a.py", "/srv/x/y/b.py")
    assert path_matches("/srv/**", "/srv/x/y/b.py")
    assert not path_matches("/srv/x*", "/srv/x/y")
    assert path_matches("module:demo.*", "module:demo.train")
    assert not path_matches("module:demo.*", "module:demo.sub.train")


# -- 2. a restarted server checks every job again --------------------------------------------


async def test_a_resumed_job_that_is_no_longer_allowed_fails_with_a_reason(tmp_path, training):
    state = str(tmp_path / "state")
    body = job("recheck", "--steps", "100000", "--step-time", "0.05", entrypoint=str(training / "link.py"))
    config = ServerConfig(state_dir=state, allow=[str(training / "**" / "*.py")])
    async with server(config) as api:
        created = (await api.post("/jobs", json=body)).json()
        # The record holds the real path, so re-pointing the link later changes nothing.
        assert created["request"]["entrypoint"] == os.path.realpath(training / "venv" / "lib" / "run.py")
        await wait_state(api, body["job_id"], "running")
    # The operator narrows the allowlist and restarts the server.
    config = ServerConfig(state_dir=state, allow=[str(training / "*.py")])
    async with server(config) as api:
        info = await wait_state(api, body["job_id"], "failed", "succeeded", "running")
        assert info["state"] == "failed"
        assert "no longer allowed" in info["reason"]


# -- 9. lows ---------------------------------------------------------------------------------


async def test_lows_are_4xx_not_500_and_headers_are_safe(tmp_path):
    config = ServerConfig(state_dir=str(tmp_path / "state"), allow=[os.path.join(SCRIPTS, "*.py")])
    async with server(config) as api:
        bad_utf8 = await api.post("/jobs", content=b'{"entrypoint": "\xff\xfe"}', headers={"Content-Type": "application/json"})
        assert bad_utf8.status_code == 400, bad_utf8.text
        body = job("lows", "--steps", "1")
        assert (await api.post("/jobs", json=body)).status_code == 201
        await wait_state(api, body["job_id"], "succeeded")
        for value in ("²", "1\u0663", "1.5"):
            path = f"/jobs/{body['job_id']}/events/stream"
            by_header = await api.get(path, headers={"Last-Event-ID": value.encode()})
            by_query = await api.get(path, params={"last_event_id": value})
            assert by_header.status_code == by_query.status_code == 400, (value, by_header.text, by_query.text)
        newline = await api.post("/jobs", json=job("lows\n"))
        assert newline.status_code == 400, newline.text
        assert (await api.get("/jobs/x%0A")).status_code == 400
        assert (await api.get("/metrics")).status_code == 200
        for response in (await api.get("/jobs"), await api.get("/health"), await api.get("/nowhere")):
            assert response.headers["x-content-type-options"] == "nosniff"
            assert "no-store" in response.headers["cache-control"]


async def test_a_wildcard_bind_is_warned_about(tmp_path, caplog):
    config = ServerConfig(state_dir=str(tmp_path / "state"))
    async with server(config, host="0.0.0.0"):
        pass
    assert any("0.0.0.0" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


# -- 5. nothing blocks the event loop --------------------------------------------------------


def finished_jobs(state_dir, count):
    """``count`` finished job records, each with a small job directory, written directly."""
    import sqlite3
    import time

    import msgspec

    from rankwarden.api._db import JobDB
    from rankwarden.api._schema import JobRequest

    JobDB(os.path.join(state_dir, "jobs.sqlite3")).close()  # the schema
    request = msgspec.json.encode(JobRequest(entrypoint=WORKER)).decode()
    now = time.time() - 3600
    rows = [(f"old-{i}", request, "succeeded", now, now) for i in range(count)]
    with contextlib.closing(sqlite3.connect(os.path.join(state_dir, "jobs.sqlite3"))) as conn, conn:
        conn.executemany("INSERT INTO jobs (job_id, request, state, created_at, updated_at) VALUES (?, ?, ?, ?, ?)", rows)
    for job_id, *_ in rows:
        os.makedirs(os.path.join(state_dir, "jobs", job_id))
        with open(os.path.join(state_dir, "jobs", job_id, "logs.jsonl"), "w") as f:
            f.write('{"id": 1}\n')


def info_done(metrics):
    return 'rankwarden_jobs{state="succeeded"} 1' in metrics


async def test_purging_many_thousands_of_jobs_never_stalls_a_running_job(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    count = 10_000
    finished_jobs(str(state), count)
    config = ServerConfig(state_dir=str(state), allow=[os.path.join(SCRIPTS, "*.py")])
    async with server(config) as api:
        body = job("purge-live", "--steps", "150", "--step-time", "0.05", heartbeat_timeout=2.0, max_restarts=0)
        assert (await api.post("/jobs", json=body)).status_code == 201
        await wait_state(api, body["job_id"], "running")
        worst = 0.0
        purged = {}

        async def purge():
            purged.update((await api.post("/jobs/purge", json={"states": ["succeeded"], "older_than_seconds": 60})).json())
            nursery.cancel_scope.cancel()

        async def probe():
            # The server shares this test's event loop, the one that also
            # serves heartbeats: a tick that comes late means it was blocked.
            nonlocal worst
            while True:
                started = trio.current_time()
                await trio.sleep(0.05)
                worst = max(worst, trio.current_time() - started - 0.05)
                assert (await api.get("/health")).status_code == 200

        with trio.fail_after(LIMIT * 2):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(purge)
                nursery.start_soon(probe)
            assert len(purged["purged"]) == count
            assert worst < 0.5, f"the event loop was blocked for {worst:.2f} s during the purge"
            metrics = await api.get("/metrics")
            # Only the live job may have finished (and be counted) meanwhile.
            assert 'rankwarden_jobs{state="succeeded"} 0' in metrics.text or info_done(metrics.text)
        info = await wait_state(api, body["job_id"], "succeeded", "failed")
        assert (info["state"], info["restarts_used"]) == ("succeeded", 0), info["reason"]
        assert not any(name.startswith("old-") for name in os.listdir(state / "jobs"))


# -- 4. server-wide limits -------------------------------------------------------------------


async def test_limits_are_refused_with_a_status_naming_the_limit(tmp_path):
    from rankwarden.api import Limits

    limits = Limits(max_ranks=2, max_jobs=1, min_heartbeat_timeout=1.0, min_progress_timeout=10.0, max_restarts=5)
    config = ServerConfig(state_dir=str(tmp_path / "state"), allow=[os.path.join(SCRIPTS, "*.py")], limits=limits)
    async with server(config) as api:
        for fields, status, name in [
            ({"heartbeat_timeout": 1e-300}, 422, "min_heartbeat_timeout=1.0"),
            ({"progress_timeout": 0.5}, 422, "min_progress_timeout=10.0"),
            ({"max_restarts": 1000}, 422, "max_restarts=5"),
            ({"world_size": 3}, 422, "max_ranks=2"),
        ]:
            response = await api.post("/jobs", json=job("limit", **fields))
            assert response.status_code == status, response.text
            assert name in response.json()["error"]
        body = job("limit-live", "--steps", "100000", "--step-time", "0.05", progress_timeout=0)
        assert (await api.post("/jobs", json=body)).status_code == 201
        second = await api.post("/jobs", json=job("limit-second"))
        assert second.status_code == 429 and "max_jobs=1" in second.json()["error"]
        await api.post(f"/jobs/{body['job_id']}/stop")
        await wait_state(api, body["job_id"], "stopped")
        assert (await api.post("/jobs", json=job("limit-second", "--steps", "1"))).status_code == 201
        await wait_state(api, "t-limit-second", "succeeded")


async def test_default_limits_refuse_the_absurd(tmp_path):
    config = ServerConfig(state_dir=str(tmp_path / "state"), allow=[os.path.join(SCRIPTS, "*.py")])
    async with server(config) as api:
        response = await api.post("/jobs", json=job("absurd", heartbeat_timeout=1e-300, max_restarts=1000))
        assert response.status_code == 422 and "min_heartbeat_timeout" in response.json()["error"]
        response = await api.post("/jobs", json=job("absurd", max_restarts=1000))
        assert response.status_code == 422 and "max_restarts" in response.json()["error"]


# -- 13. a graceful shutdown lets requests in flight finish ----------------------------------


async def test_a_request_in_flight_completes_during_shutdown(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    count = 3000
    finished_jobs(str(state), count)
    config = ServerConfig(state_dir=str(state))
    stop = trio.Event()
    result = {}
    async with trio.open_nursery() as nursery:
        url = await nursery.start(functools.partial(serve_api, config, port=0, token=TOKEN, shutdown=stop,
                                                    graceful_timeout=30.0))
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as api:

            async def purge():
                response = await api.post("/jobs/purge", json={"states": ["succeeded"]})
                result["status"], result["purged"] = response.status_code, len(response.json()["purged"])

            with trio.fail_after(LIMIT):
                async with trio.open_nursery() as inner:
                    inner.start_soon(purge)
                    # The purge is under way once its first directories are gone.
                    while len(os.listdir(state / "jobs")) == count:
                        await trio.sleep(0.01)
                    stop.set()
    assert result == {"status": 200, "purged": count}


# -- 6. unauthenticated clients cannot hold resources ----------------------------------------


async def test_the_token_is_checked_before_a_body_is_read(tmp_path):
    config = ServerConfig(state_dir=str(tmp_path / "state"))
    async with server(config) as api:
        host, port = api.base_url.host, api.base_url.port
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                # Headers promise a body that never comes: the 401 must not wait for it.
                await stream.send_all(b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                      b"Content-Length: 60000\r\n\r\n")
                answer = await _answer(stream)
                assert await stream.receive_some(4096) == b""  # closed: the client cannot keep it
        assert answer.startswith(b"HTTP/1.1 401") and b"connection: close" in answer.lower()


async def test_one_client_cannot_hold_every_request_slot(tmp_path):
    from rankwarden.api import Limits

    config = ServerConfig(state_dir=str(tmp_path / "state"), allow=[os.path.join(SCRIPTS, "*.py")],
                          limits=Limits(max_client_requests=3))
    async with server(config) as api:
        body = job("slots", "--steps", "100000", "--step-time", "0.05", progress_timeout=0)
        assert (await api.post("/jobs", json=body)).status_code == 201
        await wait_state(api, body["job_id"], "running")
        async with contextlib.AsyncExitStack() as streams:
            for _ in range(3):
                response = await streams.enter_async_context(api.stream("GET", f"/jobs/{body['job_id']}/logs/stream"))
                assert response.status_code == 200
            refused = await api.get("/health")
            assert refused.status_code == 429 and "max_client_requests=3" in refused.json()["error"]
        with trio.fail_after(LIMIT):
            while (await api.get("/health")).status_code != 200:  # the streams' slots are freed
                await trio.sleep(0.01)
        await api.post(f"/jobs/{body['job_id']}/stop")
        await wait_state(api, body["job_id"], "stopped")


async def _answer(stream) -> bytes:
    """An answer's head and (content-length) body from a raw connection."""
    answer = b""
    while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < int(
            re.search(rb"content-length: (\d+)", answer, re.I).group(1)):
        chunk = await stream.receive_some(4096)
        assert chunk, answer
        answer += chunk
    return answer


async def _raw_get(stream, path: str = "/health", *, keep_alive: bool = False) -> bytes:
    """One request on a raw connection (authenticated), and its answer."""
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                          f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n".encode())
    return await _answer(stream)


async def _connect(host: str, port: int, source: str):
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect((host, port))
    return trio.SocketStream(sock)


async def test_one_address_cannot_hold_every_connection(tmp_path):
    from rankwarden.api import Limits

    config = ServerConfig(state_dir=str(tmp_path / "state"), limits=Limits(max_client_connections=4))
    async with server(config) as api:
        host, port = api.base_url.host, api.base_url.port
        with trio.fail_after(LIMIT):
            async with contextlib.AsyncExitStack() as held:
                # Four connections from 127.0.0.1, each answered once (so surely
                # accepted and counted), then held idle.
                idle = [await held.enter_async_context(await _connect(host, port, "127.0.0.1")) for _ in range(4)]
                for stream in idle:
                    assert (await _raw_get(stream, keep_alive=True)).startswith(b"HTTP/1.1 200")
                async with await _connect(host, port, "127.0.0.1") as extra:
                    answer = await _raw_get(extra)
                assert answer.startswith(b"HTTP/1.1 429") and b"max_client_connections=4" in answer, answer
                async with await _connect(host, port, "127.0.0.2") as other:  # another client is served
                    assert (await _raw_get(other)).startswith(b"HTTP/1.1 200")
                await idle[0].aclose()
                while True:  # the closed one's slot is freed
                    async with await _connect(host, port, "127.0.0.1") as again:
                        if (await _raw_get(again)).startswith(b"HTTP/1.1 200"):
                            break
                    await trio.sleep(0.02)


async def test_a_body_must_arrive_within_the_deadline(tmp_path, monkeypatch):
    from rankwarden.api import _app

    monkeypatch.setattr(_app, "BODY_TIMEOUT", 0.5)
    config = ServerConfig(state_dir=str(tmp_path / "state"))
    async with server(config) as api:
        with trio.fail_after(10):
            async with await trio.open_tcp_stream(api.base_url.host, api.base_url.port) as stream:
                # Authenticated, promising 100 bytes, sending 10 and then nothing.
                await stream.send_all(f"POST /jobs/purge HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                                      "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n".encode()
                                      + b'{"states":')
                started = trio.current_time()
                answer = await _answer(stream)
                waited = trio.current_time() - started
                assert await stream.receive_some(4096) == b""  # and the server closes the connection
        assert answer.startswith(b"HTTP/1.1 408") and b"connection: close" in answer.lower(), answer
        assert 0.4 < waited < 5, waited
        # and the server still serves
        assert (await api.get("/health")).status_code == 200


# -- 3. job templates ------------------------------------------------------------------------

WRITER = '''
import argparse, os, sys
import rankwarden.worker as rw
p = argparse.ArgumentParser()
p.add_argument("--out"); p.add_argument("--url"); p.add_argument("--epochs", type=int); p.add_argument("--fast", action="store_true")
a = p.parse_args()
if os.environ["RANK"] == "0" and a.out:
    with open(a.out, "w") as f:
        f.write(f"epochs={a.epochs} fast={a.fast} url={a.url}")
print("argv", sys.argv[1:], flush=True)
'''


@pytest.fixture
def templated(tmp_path):
    from rankwarden.api._templates import load_templates

    script = tmp_path / "srv" / "writer.py"
    script.parent.mkdir()
    script.write_text(WRITER)
    spec = {"writer": {"entrypoint": str(script), "args": ["--epochs", "1"], "max_world_size": 2, "params": {
        "epochs": {"flag": "--epochs", "type": "int", "min": 1, "max": 10},
        "fast": {"flag": "--fast", "type": "bool"},
        "out": {"flag": "--out", "type": "output"},
        "url": {"flag": "--url", "type": "url", "schemes": ["s3"], "hosts": ["checkpoints"]},
    }}}
    path = tmp_path / "templates.json"
    path.write_text(json.dumps(spec))
    return ServerConfig(state_dir=str(tmp_path / "state"), templates=load_templates(path))


async def test_a_template_runs_with_checked_params_and_writes_only_in_its_job_dir(tmp_path, templated):
    async with server(templated) as api:
        body = {"template": "writer", "job_id": "t-tpl", "checkpoint": False,
                "params": {"epochs": 3, "fast": True, "out": "weights.pt", "url": "s3://checkpoints/run-1"}}
        created = await api.post("/jobs", json=body)
        assert created.status_code == 201, created.text
        assert created.json()["request"]["template"] == "writer" and created.json()["request"]["args"] == []
        await wait_state(api, "t-tpl", "succeeded")
        written = tmp_path / "state" / "jobs" / "t-tpl" / "outputs" / "weights.pt"
        assert written.read_text() == "epochs=3 fast=True url=s3://checkpoints/run-1"


@pytest.mark.parametrize("fields, status, text", [
    ({"params": {"out": "../../jobs.sqlite3"}}, 422, "not a plain file name"),
    ({"params": {"out": "/work/state/jobs.sqlite3"}}, 422, "not a plain file name"),
    ({"params": {"url": "http://169.254.169.254/latest"}}, 422, "scheme 'http' is not allowed"),
    ({"params": {"url": "s3://evil.example/x"}}, 422, "host 'evil.example' is not allowed"),
    ({"params": {"epochs": 11}}, 422, "above the maximum 10"),
    ({"params": {"epochs": "3; id"}}, 422, "expected an integer"),
    ({"params": {"trace": "/etc/passwd"}}, 422, "has no parameter 'trace'"),
    ({"args": ["--out", "/tmp/x"]}, 400, "params only"),
    ({"world_size": 3}, 422, "at most 2 ranks"),
    ({"template": "other"}, 403, "no job template 'other'"),
])
async def test_template_params_are_typed_and_ranged(templated, fields, status, text):
    async with server(templated) as api:
        body = {"template": "writer", "checkpoint": False, **fields}
        response = await api.post("/jobs", json=body)
        assert response.status_code == status, response.text
        assert text in response.json()["error"]


async def test_a_template_entrypoint_is_not_an_allowed_raw_entrypoint(tmp_path, templated):
    async with server(templated) as api:
        raw = {"entrypoint": templated.templates["writer"].entrypoint, "args": ["--out", "/tmp/anything"]}
        assert (await api.post("/jobs", json=raw)).status_code == 403


# -- 10. logs lose nothing -------------------------------------------------------------------

FLOOD = '''
import sys
out = sys.stdout
for i in range(int(sys.argv[1])):
    out.write(f"line {i}\\n")
out.write("x" * (2 * 1024 * 1024 + 10) + "\\n")
out.write("last line without a newline")
out.flush()
'''


async def test_every_byte_a_fast_rank_prints_reaches_the_log_in_order(tmp_path):
    script = tmp_path / "srv" / "flood.py"
    script.parent.mkdir()
    script.write_text(FLOOD)
    config = ServerConfig(state_dir=str(tmp_path / "state"), allow=[str(tmp_path / "srv" / "*.py")])
    count = 100_000
    async with server(config) as api:
        body = job("flood", str(count), entrypoint=str(script))
        assert (await api.post("/jobs", json=body)).status_code == 201
        await wait_state(api, body["job_id"], "succeeded")
        lines = (await api.get(f"/jobs/{body['job_id']}/logs", params={"lines": 100000})).json()["lines"]
    records = [json.loads(l) for l in (tmp_path / "state" / "jobs" / "t-flood" / "logs.jsonl").read_text().splitlines()]
    stdout = [r for r in records if r["stream"] == "stdout"]
    assert [r["line"] for r in stdout[:count]] == [f"line {i}" for i in range(count)]
    long = stdout[count:-1]
    assert "".join(r["line"] for r in long) == "x" * (2 * 1024 * 1024 + 10)
    assert all(r.get("split") for r in long[:-1]) and not long[-1].get("split")
    assert stdout[-1]["line"] == "last line without a newline"
    assert [r["id"] for r in records] == list(range(1, len(records) + 1))
    assert lines[-1]["line"] == "last line without a newline"


async def test_a_torn_last_record_is_cut_and_copied_again(tmp_path):
    from rankwarden.api._logs import LogCopier
    from rankwarden.coordinator._jobdir import JobDir

    job_dir = JobDir(tmp_path / "job")
    stdout, _ = job_dir.log_paths(0, 1)
    stdout.parent.mkdir(parents=True, exist_ok=True)
    stdout.write_bytes(b"one\ntwo\nthree\n")
    combined = tmp_path / "job" / "logs.jsonl"
    first = LogCopier(job_dir, combined)
    assert await first.copy([(0, 1)]) == 3
    with open(combined, "ab") as f:  # a crash in the middle of the next write
        f.write(b'{"id": 4, "attempt": 1, "ra')
    stdout.write_bytes(b"one\ntwo\nthree\nfour\n")
    second = LogCopier(job_dir, combined)
    assert await second.copy([(0, 1)]) == 1
    records = [json.loads(l) for l in combined.read_text().splitlines()]
    assert [(r["id"], r["line"]) for r in records] == [(1, "one"), (2, "two"), (3, "three"), (4, "four")]
